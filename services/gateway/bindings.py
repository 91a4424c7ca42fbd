"""The REST route table, read from the `google.api.http` options of the service descriptors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.api import annotations_pb2 as google_annotations
from google.api import http_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from vers.common.v1 import annotations_pb2 as vers_annotations
from vers.orchestrator.v1 import hosts_pb2, images_pb2, orchestrator_pb2
from vers.registry.v1 import registry_pb2
from vers.tagging.v1 import tagging_pb2

SERVICE_DESCRIPTORS: tuple[ServiceDescriptor, ...] = (
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    tagging_pb2.DESCRIPTOR.services_by_name["TaggingService"],
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    images_pb2.DESCRIPTOR.services_by_name["ImagesService"],
    hosts_pb2.DESCRIPTOR.services_by_name["HostsService"],
)

_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_VERBS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Binding:
    verb: str
    path: str
    body: str
    response_body: str
    success_code: int
    method: MethodDescriptor
    # 0 for the rule itself, n for its n-th additional binding
    alternate: int = 0

    @property
    def backend(self) -> str:
        """The service that serves it, from its package: vers.<backend>.v1."""
        return self.method.containing_service.full_name.split(".")[1]

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(_VARIABLE.findall(self.path))

    @property
    def streaming(self) -> bool:
        return self.method.client_streaming or self.method.server_streaming

    def sort_key(self) -> tuple[int, ...]:
        """Literal segments before variables, position by position, so /repositories/fork beats /{repo_name}."""
        return tuple(1 if _VARIABLE.fullmatch(part) else 0 for part in self.path.split("/"))


def _rules(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def method_bindings(method: MethodDescriptor) -> list[Binding]:
    options = method.GetOptions()
    if not options.HasExtension(google_annotations.http):
        return []
    success_code = options.Extensions[vers_annotations.http_success_code] or 200
    found = []
    for alternate, rule in enumerate(_rules(options.Extensions[google_annotations.http])):
        verb = rule.WhichOneof("pattern")
        if verb not in _VERBS:
            raise ValueError(f"{method.full_name}: unsupported HTTP pattern {verb!r}")
        path = getattr(rule, verb)
        found.append(Binding(verb.upper(), path, rule.body, rule.response_body, success_code, method, alternate))
    return found


def all_bindings(services: Iterable[ServiceDescriptor] = SERVICE_DESCRIPTORS) -> list[Binding]:
    found = [binding for service in services for method in service.methods for binding in method_bindings(method)]
    return sorted(found, key=Binding.sort_key)
