"""How a host agent says it has no room, so that the API places the VM on another host instead."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The detail of a RESOURCE_EXHAUSTED that this host's room refused (not the organization's limits): the
# orchestrator API then tries the next host with room.
HOST_FULL = error_details_pb2.ErrorInfo(reason="HOST_FULL", domain="vers.orchestrator")


def is_host_full(error: grpc.aio.AioRpcError) -> bool:
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a details trailer that does not match the call's status: not ours
        return False
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.reason == HOST_FULL.reason and info.domain == HOST_FULL.domain:
            return True
    return False
