"""Labels, disk resize and the system version."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from services.common.auth import current_principal
from services.common.errors import InvalidArgument
from services.common.names import VM_LABEL_KEY_MAX, VM_LABEL_VALUE_MAX_BYTES, VM_LABELS_MAX
from vers.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from services.orchestrator.engine import Engine
    from services.orchestrator.store import OrchestratorStore

SOURCE_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "vers-platform"


def parse_label_filters(filters: list[str]) -> list[tuple[str, str | None]]:
    """`?label=KEY=VALUE` (that value) or `?label=KEY` (any value), each as (key, value or None); no more
    filters than a VM may have labels, and none longer than a label may be (each is a subquery)."""
    if len(filters) > VM_LABELS_MAX:
        raise InvalidArgument(f"{len(filters)} label filters: at most {VM_LABELS_MAX}, as many as a VM may have labels")
    parsed: list[tuple[str, str | None]] = []
    for item in filters:
        key, equals, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"label filter {item[:64]!r} has no key: use label=KEY=VALUE, or label=KEY for any value")
        if len(key) > VM_LABEL_KEY_MAX or len(value.encode()) > VM_LABEL_VALUE_MAX_BYTES:
            raise InvalidArgument(
                f"label filter {item[:64]!r} is longer than a label can be (keys {VM_LABEL_KEY_MAX} characters, values "
                f"{VM_LABEL_VALUE_MAX_BYTES} bytes): no VM has it"
            )
        parsed.append((key, value if equals else None))
    return parsed


def _read_ref(git_dir: Path, ref: str) -> str:
    loose = git_dir / ref
    if loose.is_file():
        return loose.read_text().strip()
    packed = git_dir / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and not line.startswith(("#", "^")):
                return sha
    return ""


def git_hash_of(root: Path) -> str:
    """The commit a git checkout at `root` has out ("" when it is none): read from its files, so neither a
    `git` program nor a repository owned by another user stands in the way."""
    git_dir = root / ".git"
    try:
        if git_dir.is_file():  # a worktree or submodule: "gitdir: PATH"
            git_dir = (root / git_dir.read_text().strip().removeprefix("gitdir:").strip()).resolve()
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head  # a detached HEAD is the hash itself
        ref = head.removeprefix("ref:").strip()
        found = _read_ref(git_dir, ref)
        if not found and (common := git_dir / "commondir").is_file():  # a worktree's branches live in the main one
            found = _read_ref((git_dir / common.read_text().strip()).resolve(), ref)
        return found
    except OSError:
        return ""


@functools.cache
def system_version(configured_hash: str) -> pb.GetSystemVersionResponse:
    """What this orchestrator runs, worked out once: the package's version, and the source tree's commit
    (else VERS_GIT_HASH, which an installed package sets, else "unknown")."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return pb.GetSystemVersionResponse(
        executable_name="orchestrator", workspace_version=version, git_hash=git_hash_of(SOURCE_ROOT) or configured_hash or "unknown"
    )


class VmAdminMethods:
    """Methods of OrchestratorServicer (a mixin: `self` is the servicer)."""

    engine: Engine
    store: OrchestratorStore

    async def UpsertVmLabels(self, request: pb.UpsertVmLabelsRequest, context: grpc.aio.ServicerContext) -> pb.UpsertVmLabelsResponse:
        given = dict(request.labels)
        labels = await self.store.change_labels(current_principal().org_id, request.vm_id, lambda labels: {**labels, **given})
        return pb.UpsertVmLabelsResponse(labels=labels)

    async def ReplaceVmLabels(self, request: pb.ReplaceVmLabelsRequest, context: grpc.aio.ServicerContext) -> pb.ReplaceVmLabelsResponse:
        given = dict(request.labels)
        labels = await self.store.change_labels(current_principal().org_id, request.vm_id, lambda _labels: given)
        return pb.ReplaceVmLabelsResponse(labels=labels)

    async def DeleteVmLabel(self, request: pb.DeleteVmLabelRequest, context: grpc.aio.ServicerContext) -> pb.DeleteVmLabelResponse:
        # A label that is not there is already deleted: 200 with the labels, as the hosted service answers,
        # so a retried or repeated delete never fails (a missing VM is still 404).
        name = request.label_name
        labels = await self.store.change_labels(
            current_principal().org_id, request.vm_id, lambda labels: {key: value for key, value in labels.items() if key != name}
        )
        return pb.DeleteVmLabelResponse(labels=labels)

    async def ResizeVmDisk(self, request: pb.ResizeVmDiskRequest, context: grpc.aio.ServicerContext) -> pb.ResizeVmDiskResponse:
        if request.fs_size_mib <= 0:
            raise InvalidArgument(f"fs_size_mib must be the new size in MiB, more than the current one; not {request.fs_size_mib}")
        vm = await self.store.get_vm(current_principal().org_id, request.vm_id)
        grown = await self.engine.resize_disk(vm, request.fs_size_mib, request.skip_wait_boot)
        return pb.ResizeVmDiskResponse(vm_id=grown.id, fs_size_mib=grown.fs_size_mib)

    async def GetSystemVersion(self, request: pb.GetSystemVersionRequest, context: grpc.aio.ServicerContext) -> pb.GetSystemVersionResponse:
        answer = pb.GetSystemVersionResponse()
        answer.CopyFrom(system_version(self.engine.settings.git_hash))
        return answer
