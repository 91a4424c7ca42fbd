from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from services.common.audit import service_page
from services.common.auth import ServiceCredential, current_principal
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.faults import fault_point
from services.common.names import (
    COMMIT_DESCRIPTION_MAX_BYTES,
    COMMIT_NAME_MAX,
    require_uuid,
    validate_label,
    validate_text,
    validate_vm_labels,
)
from services.common.paging import Page
from services.common.timestamps import as_utc, to_timestamp
from services.orchestrator import console, tunnel
from services.orchestrator.deploy import DeployMethods
from services.orchestrator.domains import Domains, domain_pb
from services.orchestrator.engine import SSH_PORT, Engine
from services.orchestrator.envvars import EnvVarMethods
from services.orchestrator.execs import ExecStreamMethods, new_exec_id
from services.orchestrator.files import FileMethods
from services.orchestrator.models import CommitRow, ForkRequestRow, SecretScanRow, VmRow, require_not_paused
from services.orchestrator.network import GUEST_ADDRESS
from services.orchestrator.placement import HOST_FULL
from services.orchestrator.publishing import CommitMethods
from services.orchestrator.store import OrchestratorStore
from services.orchestrator.vmadmin import VmAdminMethods, parse_label_filters
from services.orchestrator.vmconfig import VmConfig
from vers.common.v1 import governance_pb2
from vers.orchestrator.v1 import orchestrator_pb2 as pb
from vers.orchestrator.v1 import orchestrator_pb2_grpc
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
# Findings one ScanCommits answer carries at most.
MAX_SCAN_FINDINGS = 2000
MAX_PAGE = 500


def vm_pb(vm: VmRow) -> pb.Vm:
    return pb.Vm(vm_id=vm.id, owner_id=vm.org_id, state=vm.state, created_at=to_timestamp(vm.created_at), labels=json.loads(vm.labels))


def commit_pb(commit: CommitRow, sizes: tuple[int, int] = (0, 0)) -> pb.Commit:
    """The commit, with its bytes held alone and shared when `sizes` gives them (Engine.commit_bytes)."""
    return pb.Commit(
        commit_id=commit.id,
        owner_id=commit.org_id,
        name=commit.name,
        description=commit.description,
        is_public=commit.is_public,
        created_at=to_timestamp(commit.created_at),
        parent_vm_id=commit.parent_vm_id or "",
        grandparent_commit_id=commit.grandparent_commit_id or "",
        bytes_alone=sizes[0],
        bytes_shared=sizes[1],
    )


def findings_pb(scan: SecretScanRow) -> list[governance_pb2.SecretFinding]:
    return [governance_pb2.SecretFinding(commit_id=scan.commit_id, **finding) for finding in json.loads(scan.findings)]


def lineage_pb(commit: CommitRow) -> pb.CommitLineageEntry:
    entry = commit_pb(commit)
    return pb.CommitLineageEntry(
        id=entry.commit_id,
        owner_id=entry.owner_id,
        name=entry.name,
        description=entry.description,
        is_public=entry.is_public,
        created_at=entry.created_at,
        parent_vm_id=entry.parent_vm_id,
        grandparent_commit_id=entry.grandparent_commit_id,
    )


class OrchestratorServicer(
    ExecStreamMethods,
    FileMethods,
    VmAdminMethods,
    CommitMethods,
    EnvVarMethods,
    DeployMethods,
    orchestrator_pb2_grpc.OrchestratorServiceServicer,
):
    def __init__(
        self, engine: Engine, store: OrchestratorStore, tagging: grpc.aio.Channel, credential: ServiceCredential, domains: Domains
    ) -> None:
        self.engine = engine
        self.store = store
        self.tagging = tagging_pb2_grpc.TaggingInternalServiceStub(tagging)
        self.credential = credential
        self.domains = domains

    async def _vm(self, vm_id: str) -> VmRow:
        return await self.store.get_vm(current_principal().org_id, vm_id)

    async def _commit(self, commit_id: str) -> CommitRow:
        return await self.store.get_commit(current_principal().org_id, commit_id)

    async def _resolve(self, ref: str = "", tag_name: str = "") -> CommitRow:
        """The org's commit a reference names: the tagging service resolves it (an internal call, as the org)."""
        answer = await self.tagging.ResolveReference(
            tagging_pb2.ResolveReferenceRequest(ref=ref, tag_name=tag_name), metadata=self.credential.metadata(current_principal().org_id)
        )
        return await self._commit(answer.commit_id)

    async def _branch(self, vm_or_commit_id: str, count: int, keep_paused: bool) -> list[pb.NewVm]:
        org_id = current_principal().org_id
        vm = await self.store.find_vm(org_id, vm_or_commit_id)
        if vm is not None:
            await self.store.require_commit_room(org_id)
            commit, _ = await self.engine.commit(vm, f"branch of {vm.id}", "", keep_paused)
        else:
            try:  # one of the org's commits, or a public one of any org
                commit = await self.store.visible_commit(org_id, vm_or_commit_id)
            except NotFound:
                raise NotFound(f"no VM or commit {vm_or_commit_id!r} in your organization, nor a public commit") from None
        return await self._branches(commit, count)

    async def _branches(self, commit: CommitRow, count: int) -> list[pb.NewVm]:
        """The step every branch ends with: `count` new VMs (1 when 0) of the caller's org, started from the commit."""
        return [pb.NewVm(vm_id=vm.id) for vm in await self.engine.restore(current_principal().org_id, commit, count or 1)]

    async def CreateRootVm(self, request: pb.CreateRootVmRequest, context: grpc.aio.ServicerContext) -> pb.CreateRootVmResponse:
        validate_vm_labels(dict(request.vm_config.labels))
        vm = await self.engine.create_root(current_principal().org_id, VmConfig.of(request.vm_config), request.wait_boot)
        return pb.CreateRootVmResponse(vm_id=vm.id)

    async def RestoreFromCommit(
        self, request: pb.RestoreFromCommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.RestoreFromCommitResponse:
        given = [name for name in ("commit_id", "tag_name", "ref") if getattr(request, name)]
        if len(given) != 1:
            raise InvalidArgument(
                f"send exactly one of commit_id, tag_name or ref (got {', '.join(given) or 'none'}), "
                'e.g. {"commit_id": "<uuid>"} or {"ref": "my-app:latest"}'
            )
        if request.commit_id:
            hint = '; to restore by repo:tag send {"ref": "' + request.commit_id + '"}' if ":" in request.commit_id else ""
            commit = await self._branchable(require_uuid(request.commit_id, "commit_id", hint))
        else:
            commit = await self._resolve(ref=request.ref, tag_name=request.tag_name)
        [vm] = await self.engine.restore(current_principal().org_id, commit)
        return pb.RestoreFromCommitResponse(vm_id=vm.id)

    async def BranchVm(self, request: pb.BranchVmRequest, context: grpc.aio.ServicerContext) -> pb.BranchVmResponse:
        return pb.BranchVmResponse(vms=await self._branch(request.vm_or_commit_id, request.count, request.keep_paused))

    async def BranchByVm(self, request: pb.BranchByVmRequest, context: grpc.aio.ServicerContext) -> pb.BranchByVmResponse:
        vm = await self._vm(request.vm_id)
        return pb.BranchByVmResponse(vms=await self._branch(vm.id, request.count, request.keep_paused))

    async def BranchByCommit(self, request: pb.BranchByCommitRequest, context: grpc.aio.ServicerContext) -> pb.BranchByCommitResponse:
        commit = await self._branchable(request.commit_id)
        return pb.BranchByCommitResponse(vms=await self._branches(commit, request.count))

    async def BranchByTag(self, request: pb.BranchByTagRequest, context: grpc.aio.ServicerContext) -> pb.BranchByTagResponse:
        commit = await self._resolve(tag_name=request.tag_name)
        return pb.BranchByTagResponse(vms=await self._branches(commit, request.count))

    async def BranchByRef(self, request: pb.BranchByRefRequest, context: grpc.aio.ServicerContext) -> pb.BranchByRefResponse:
        commit = await self._resolve(ref=f"{request.repo_name}:{request.tag_name}")
        return pb.BranchByRefResponse(vms=await self._branches(commit, request.count))

    async def CommitVm(self, request: pb.CommitVmRequest, context: grpc.aio.ServicerContext) -> pb.CommitVmResponse:
        validate_label("name", request.name, COMMIT_NAME_MAX)
        validate_text("description", request.description, COMMIT_DESCRIPTION_MAX_BYTES)
        vm = await self._vm(request.vm_id)
        await self.store.require_commit_room(vm.org_id)
        commit, _ = await self.engine.commit(vm, request.name, request.description, request.keep_paused)
        return pb.CommitVmResponse(commit_id=commit.id)

    async def UpdateVmState(self, request: pb.UpdateVmStateRequest, context: grpc.aio.ServicerContext) -> pb.UpdateVmStateResponse:
        vm = await self.engine.set_state(await self._vm(request.vm_id), request.state, request.skip_wait_boot)
        return pb.UpdateVmStateResponse(vm=vm_pb(vm))

    async def ListVms(self, request: pb.ListVmsRequest, context: grpc.aio.ServicerContext) -> pb.ListVmsResponse:
        org_id = current_principal().org_id
        labels = parse_label_filters(list(request.label))
        # A token of one filter is no good for another: the filters are part of the list's scope.
        scope = f"vms:{org_id}" + (":" + json.dumps(sorted(labels, key=str)) if labels else "")
        page = Page.of(scope, request.page_size, request.page_token)
        vms, token = page.cut(await self.store.list_vms(org_id, page.offset, page.fetch, labels))
        return pb.ListVmsResponse(vms=[vm_pb(vm) for vm in vms], next_page_token=token)

    async def GetVmStatus(self, request: pb.GetVmStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetVmStatusResponse:
        return pb.GetVmStatusResponse(vm=vm_pb(await self._vm(request.vm_id)))

    async def GetVmMetadata(self, request: pb.GetVmMetadataRequest, context: grpc.aio.ServicerContext) -> pb.GetVmMetadataResponse:
        vm = await self._vm(request.vm_id)
        metadata = pb.VmMetadata(
            vm_id=vm.id,
            owner_id=vm.org_id,
            state=vm.state,
            created_at=to_timestamp(vm.created_at),
            mem_size_mib=vm.mem_size_mib,
            vcpu_count=vm.vcpu_count,
            parent_commit_id=vm.parent_commit_id or "",
            grandparent_vm_id=vm.grandparent_vm_id or "",
            ip=GUEST_ADDRESS if vm.network else "",
            network=vm.network,
            fs_size_mib=vm.fs_size_mib,
            labels=json.loads(vm.labels),
        )
        return pb.GetVmMetadataResponse(metadata=metadata)

    async def ExecVm(self, request: pb.ExecVmRequest, context: grpc.aio.ServicerContext) -> pb.ExecVmResponse:
        vm = await self._vm(request.vm_id)
        require_not_paused(vm)
        exec_id = new_exec_id(request.exec_id)  # names its output in the VM's exec log too (a UUID: bounded)
        result = await self.engine.exec(
            vm,
            list(request.command),
            env=await self._exec_env(vm.org_id, request.env),
            stdin=request.stdin.encode() if request.stdin else None,
            working_dir=request.working_dir,
            timeout_secs=request.timeout_secs,
            exec_id=exec_id,
        )
        return pb.ExecVmResponse(
            exit_code=result.exit_code,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            exec_id=exec_id,
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
        )

    async def DeleteVm(self, request: pb.DeleteVmRequest, context: grpc.aio.ServicerContext) -> pb.DeleteVmResponse:
        vm = await self._vm(request.vm_id)
        await self.engine.delete_vm(vm)
        return pb.DeleteVmResponse(vm_id=vm.id)

    async def ListCommits(self, request: pb.ListCommitsRequest, context: grpc.aio.ServicerContext) -> pb.ListCommitsResponse:
        limit = request.limit or DEFAULT_PAGE
        if not 1 <= limit <= MAX_PAGE or request.offset < 0:
            raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE} and offset at least 0")
        commits, total = await self.store.list_commits(current_principal().org_id, limit, request.offset)
        sizes = await self.engine.commit_bytes(commits)
        return pb.ListCommitsResponse(commits=[commit_pb(c, sizes[c.id]) for c in commits], total=total, limit=limit, offset=request.offset)

    async def GetCommit(self, request: pb.GetCommitRequest, context: grpc.aio.ServicerContext) -> pb.GetCommitResponse:
        commit = await self._commit(request.commit_id)
        sizes = await self.engine.commit_bytes([commit])
        return pb.GetCommitResponse(commit=commit_pb(commit, sizes[commit.id]))

    async def ListCommitParents(
        self, request: pb.ListCommitParentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCommitParentsResponse:
        chain = await self.store.lineage(current_principal().org_id, request.commit_id)
        return pb.ListCommitParentsResponse(commits=await self._lineage_shown(chain))

    async def DeleteCommit(self, request: pb.DeleteCommitRequest, context: grpc.aio.ServicerContext) -> pb.DeleteCommitResponse:
        # The engine marks it as being deleted, then the tagging service checks no tag names it (and from
        # then on refuses new ones) in one transaction of its own: no tag can slip in between.
        commit = await self._commit(request.commit_id)
        await self.engine.delete_commit(current_principal().org_id, commit.id)
        return pb.DeleteCommitResponse()

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ConnectResponse]:
        """Relay keystrokes to the VM's console (hvc0, a login shell) and its output back. The first
        answer is empty: it says the console is open. The stream ends when the guest's shell exits."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.vm_id:
            raise InvalidArgument("the first message of Connect names the VM: {vm_id}")
        vm = await self._vm(first.vm_id)
        require_not_paused(vm)
        machine = await self.engine.wait_booted(vm)

        async def resize(rows: int, cols: int) -> None:
            await machine.agent.exec(
                ["stty", "-F", "/dev/hvc0", "rows", str(rows), "cols", str(cols)],
                timeout_secs=5,
                wait=10.0,
                max_running=self.engine.settings.vm_max_execs,
            )

        async with self.engine.console(vm) as (reader, writer):
            yield pb.ConnectResponse()
            async for output in console.relay(first, request_iterator, reader, writer, resize):
                yield pb.ConnectResponse(output=output)

    async def OpenTunnel(
        self, request_iterator: AsyncIterator[pb.OpenTunnelRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.OpenTunnelResponse]:
        """One TCP connection to a port of the VM. The first answer is empty: the connection is open."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.vm_id:
            raise InvalidArgument("the first message of OpenTunnel names the VM and its port: {vm_id, port}")
        vm = await self._vm(first.vm_id)
        async with self.engine.connect_port(vm, first.port) as (reader, writer):
            yield pb.OpenTunnelResponse()
            async for data in tunnel.pipe(first.data, request_iterator, reader, writer):
                yield pb.OpenTunnelResponse(data=data)

    async def GetSshKey(self, request: pb.GetSshKeyRequest, context: grpc.aio.ServicerContext) -> pb.GetSshKeyResponse:
        vm = await self._vm(request.vm_id)
        if not vm.network:
            raise FailedPrecondition(f"VM {vm.id} was made before VMs had a network card: it has no SSH access")
        require_not_paused(vm)
        key = await self.engine.ssh_key(vm)
        return pb.GetSshKeyResponse(ssh_port=SSH_PORT, ssh_private_key=key.private_key)

    # Domains (services/orchestrator/domains.py)

    async def ListDomains(self, request: pb.ListDomainsRequest, context: grpc.aio.ServicerContext) -> pb.ListDomainsResponse:
        org_id = current_principal().org_id
        # vm_id filters: another org's VM lists nothing, as a VM that does not exist does
        page = Page.of(f"domains:{org_id}:{request.vm_id}", request.page_size, request.page_token)
        domains, token = page.cut(await self.domains.list(org_id, request.vm_id, page.offset, page.fetch))
        return pb.ListDomainsResponse(domains=[domain_pb(domain) for domain in domains], next_page_token=token)

    async def CreateDomain(self, request: pb.CreateDomainRequest, context: grpc.aio.ServicerContext) -> pb.CreateDomainResponse:
        return pb.CreateDomainResponse(domain=domain_pb(await self.domains.create(current_principal().org_id, request)))

    async def GetDomain(self, request: pb.GetDomainRequest, context: grpc.aio.ServicerContext) -> pb.GetDomainResponse:
        return pb.GetDomainResponse(domain=domain_pb(await self.domains.get(current_principal().org_id, request.domain_id)))

    async def DeleteDomain(self, request: pb.DeleteDomainRequest, context: grpc.aio.ServicerContext) -> pb.DeleteDomainResponse:
        domain = await self.domains.delete(current_principal().org_id, request.domain_id)
        return pb.DeleteDomainResponse(domain_id=domain.id)


class OrchestratorInternalServicer(orchestrator_pb2_grpc.OrchestratorInternalServiceServicer):
    """Calls only the platform's own services make (the service credential, acting for an org): the fork
    step of the registry's fork saga, and its undo; the secret scan before publishing, the collection of
    commits and the audit entries of this service, for the registry's governance. Each fork is noted under
    its saga's id as it goes (fork_requests), so whatever a fork made can be found again after any crash."""

    def __init__(self, engine: Engine, store: OrchestratorStore) -> None:
        self.engine = engine
        self.store = store
        self._forks: dict[str, asyncio.Task[ForkRequestRow]] = {}

    async def ForkCommit(self, request: pb.ForkCommitRequest, context: grpc.aio.ServicerContext) -> pb.ForkCommitResponse:
        """The fork runs as a task of its own, so a caller that goes away (a registry that dies) does not cut
        it short halfway: it ends noted, for the saga to keep or undo. A second call for the saga joins it."""
        saga_id = require_uuid(request.saga_id, "saga_id")
        task = self._forks.get(saga_id)
        if task is None:
            task = asyncio.create_task(self._fork(saga_id, current_principal().org_id, request))
            self._forks[saga_id] = task
            task.add_done_callback(lambda done: self._forget(saga_id, done))
        row = await asyncio.shield(task)
        return pb.ForkCommitResponse(vm_id=row.vm_id or "", commit_id=row.commit_id or "")

    async def close(self) -> None:
        """A stop lets the forks under way (each a task of its own) end before the engine stops."""
        await asyncio.gather(*self._forks.values(), return_exceptions=True)

    def _forget(self, saga_id: str, task: asyncio.Task[ForkRequestRow]) -> None:
        self._forks.pop(saga_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: its caller may have gone

    async def _fork(self, saga_id: str, org_id: str, request: pb.ForkCommitRequest) -> ForkRequestRow:
        row = await self.store.claim_fork(saga_id, org_id)
        if row.state == "done":
            return row
        if row.state == "abandoned":
            raise Conflict(f"fork {saga_id} was abandoned (its saga was undone): fork again")
        try:
            # The fork's commit first: a copy of the source commit (its files linked, its layers shared), which is
            # what committing a VM just started from the source would make, without running anything. Its id is
            # noted before it is made, so a crash in between leaves nothing unnoted.
            if row.commit_id is None:
                row = await self._note(saga_id, commit_id=str(uuid.uuid4()))
            commit = await self.store.commit_row(row.commit_id or "")
            if commit is None:
                # The registry found the commit (the tag of a public repository); the secret scan is checked here.
                source = await self.store.published_commit(request.source_commit_id)
                await self._require_scanned(source, request.source_reference)
                await self.store.require_commit_room(org_id)
                name = f"fork of {request.source_reference}"
                commit = await self.engine.copy_commit(org_id, source, row.commit_id or "", name, request.description)
                fault_point("fork.after_copy")
            # Then its VM, started from the org's own copy. Noted before it is made too; a new id when the VM noted
            # before is gone (a host without room discarded it: the fork goes on on another, from the same copy).
            made = await self.store.vm(row.vm_id) if row.vm_id is not None else None
            if made is None or made.deleted_at is not None:
                if row.vm_id is None or made is not None:
                    row = await self._note(saga_id, vm_id=str(uuid.uuid4()))
                await self.engine.restore(org_id, commit, vm_ids=[row.vm_id or ""])
                fault_point("fork.after_restore")
            row = await self._note(saga_id, state="done")
            fault_point("fork.after_done")
        except ResourceExhausted as error:
            if HOST_FULL not in error.details:  # this host has no room: the fork goes on another, with the VM it discarded
                await self._abandon(saga_id, org_id)
            raise
        except Exception:
            await self._abandon(saga_id, org_id)
            raise
        return row

    async def _require_scanned(self, source: CommitRow, reference: str) -> None:
        """A published commit is forked only once it passed the secret scan of the current rules, or its owner
        published it despite findings. One never scanned (public before the scan existed, or tagged since) is
        scanned now. What the scan found is its owner's to see, not the forker's."""
        scan = await self.engine.scan(source)
        findings = json.loads(scan.findings)
        if findings and scan.forced_at is None:
            # the operator's log says where (never what): its owner learns it by publishing again
            places = sorted({f"{f['rule']} in {f['where']}" + (f" {f['path']}" if f["path"] else "") for f in findings})
            log.warning("a fork of %s (commit %s) is refused: its secret scan found %d secret(s): %s",
                        reference, source.id, len(findings), "; ".join(places[:20]))  # fmt: skip
            raise Conflict(
                f"{reference} has not passed the secret scan that publishing now requires, so it cannot be forked: "
                f"its owner must publish it again (make the repository public again, which scans it) before anyone "
                f"can fork it"
            )

    async def _note(self, saga_id: str, **changes: str) -> ForkRequestRow:
        row = await self.store.record_fork(saga_id, **changes)
        if row.state == "abandoned":
            raise Conflict(f"fork {saga_id} was abandoned while it ran (its saga was undone): fork again")
        return row

    async def AbandonFork(self, request: pb.AbandonForkRequest, context: grpc.aio.ServicerContext) -> pb.AbandonForkResponse:
        """Marked abandoned first, so a fork still running stops at its next step; once it has stopped,
        whatever it noted is deleted. Deleting what is already gone is no error, so a retry is harmless."""
        saga_id = require_uuid(request.saga_id, "saga_id")
        org_id = current_principal().org_id
        await self.store.abandon_fork(saga_id, org_id)
        running = self._forks.get(saga_id)
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        row = await self._abandon(saga_id, org_id)
        return pb.AbandonForkResponse(vm_id=row.vm_id or "", commit_id=row.commit_id or "")

    async def _abandon(self, saga_id: str, org_id: str) -> ForkRequestRow:
        row = await self.store.abandon_fork(saga_id, org_id)
        await self._delete_made(row)
        return row

    async def _delete_made(self, row: ForkRequestRow) -> None:
        """The fork's VM, then its commit (the VM stands on it). Two abandons at once are safe: the engine
        deletes a VM or a commit once, and answers NotFound to the other. A commit noted whose row was never
        recorded (a crash cut its copy short) has its files removed, should any be left."""
        vm = await self.store.vm(row.vm_id) if row.vm_id is not None else None
        if vm is not None and vm.deleted_at is None:
            with contextlib.suppress(NotFound):
                await self.engine.delete_vm(vm)
        if row.commit_id is not None and await self.store.commit_row(row.commit_id) is None:
            await asyncio.to_thread(self.engine.commit_store.delete_commit, row.commit_id)
        elif row.commit_id is not None:
            try:
                await self.engine.delete_commit(row.org_id, row.commit_id)
            except NotFound:
                pass  # deleted before: an earlier abandon of this saga
            except Conflict as error:
                log.warning("commit %s of the abandoned fork %s is kept: %s", row.commit_id, row.saga_id, error.message)
        log.info("fork %s abandoned: VM %s and commit %s deleted", row.saga_id, row.vm_id or "(none)", row.commit_id or "(none)")

    # Governance (the registry's: secret scan before publishing, retention, audit log)

    async def ScanCommits(self, request: pb.ScanCommitsRequest, context: grpc.aio.ServicerContext) -> pb.ScanCommitsResponse:
        principal = current_principal()
        commits = [await self.store.get_commit(principal.org_id, commit_id) for commit_id in dict.fromkeys(request.commit_ids)]
        findings = []
        for commit in commits:  # one at a time: a scan reads all of a commit's memory and disk
            scan = await self.engine.scan(commit)
            if request.force and json.loads(scan.findings):
                forced_by = request.actor_key_id or principal.key_id
                scan = await self.store.force_secret_scan(commit.id, scan.rules_version, forced_by, request.purpose)
            findings += findings_pb(scan)
        # the first of them: an answer stays well under the message size however many commits hold keys
        return pb.ScanCommitsResponse(findings=findings[:MAX_SCAN_FINDINGS])

    async def CollectCommits(self, request: pb.CollectCommitsRequest, context: grpc.aio.ServicerContext) -> pb.CollectCommitsResponse:
        if request.untagged_older_than_days < 0 or any(c.min_age_days < 0 for c in request.candidates):
            raise InvalidArgument("untagged_older_than_days and min_age_days are days: 0 or more")
        org_id = current_principal().org_id
        candidates = {c.commit_id: (c.reason, c.min_age_days) for c in request.candidates}
        chosen = await self.store.collectable(org_id, candidates, set(request.protected_commit_ids), request.untagged_older_than_days)
        collected = await self.engine.collect_commits(org_id, chosen, request.dry_run, request.actor_key_id)
        commits = [
            governance_pb2.CollectedCommit(
                commit_id=found.commit.id, name=found.commit.name, reason=found.reason, bytes_freed=freed,
                created_at=as_utc(found.commit.created_at).isoformat(),
            )
            for found, freed in collected
        ]  # fmt: skip
        return pb.CollectCommitsResponse(commits=commits, bytes_freed=sum(c.bytes_freed for c in commits))

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext) -> pb.ListAuditEventsResponse:
        events, token = await service_page(self.store.db, "orchestrator", current_principal().org_id, request)
        return pb.ListAuditEventsResponse(events=events, next_page_token=token)
