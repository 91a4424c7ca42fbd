"""Deploy: a new VM that clones a git repository, builds it and starts it.

The whole pipeline runs in the guest as one detached exec session whose id is the deploy's project id, so
its progress is read (and re-read after a dropped connection) as any streaming exec's: AttachExecStream."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc

from services.common.auth import current_principal
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument
from services.common.names import validate_text, validate_vm_labels
from services.orchestrator.vmconfig import VmConfig
from vers.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Mapping

    from services.orchestrator.engine import Engine
    from services.orchestrator.store import OrchestratorStore

# The labels a deploy's VM carries: the deploy's name (unique among the org's VMs) and its project id.
NAME_LABEL = "vers.deploy"
PROJECT_LABEL = "vers.deploy.project"
# Where the run command's output goes in the guest (it outlives the session that started it).
RUN_LOG = "/var/log/vers-deploy.log"
# Git transports a deploy clones over: no ssh (no key to use), no file:// or ext:: (the guest's own files
# or commands).
SCHEMES = ("http", "https", "git")
# A deploy's name: a DNS label's length, letters, digits, '.', '_' and '-', starting with a letter or digit
# (it names the folder the repository is cloned into, /root/NAME, and labels the VM).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# `owner/repo` as a forge spells it.
_OWNER_REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
# What git refuses in a branch name (git check-ref-format), and what a shell or a log line would misread.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
COMMAND_MAX_BYTES = 4096
BRANCH_MAX = 255


@dataclass(frozen=True)
class DeployPlan:
    url: str
    branch: str
    name: str
    working_directory: str
    install: str
    build: str
    run: str
    # Where the repository is cloned, and where the run command's output goes.
    folder: str
    run_log: str = RUN_LOG


def git_url(repo: str, base: str) -> str:
    """The URL to clone: `owner/repo` joined to `base` as BASE + owner/repo + ".git" (unless it already ends
    in .git: forges answer either, a plain HTTP server only the bare repository's folder), or a full http,
    https or git URL as given."""
    repo = repo.strip()
    if not repo:
        raise InvalidArgument('repo is empty: give "owner/repo" or a git URL (https://host/owner/repo.git)')
    if repo.startswith("-"):
        raise InvalidArgument(f"repo {repo!r} starts with '-': give \"owner/repo\" or a git URL")
    if re.search(r"[\x00-\x20\x7f]", repo):
        raise InvalidArgument(f'repo {repo!r} contains a space or a control character: give "owner/repo" or a git URL')
    if "://" not in repo:
        if not _OWNER_REPO.fullmatch(repo) or any(part.strip(".") == "" for part in repo.split("/")):
            raise InvalidArgument(
                f"repo {repo!r} is neither \"owner/repo\" (letters, digits, '.', '_', '-') nor a git URL "
                f"({', '.join(s + '://' for s in SCHEMES)})"
            )
        return base.rstrip("/") + "/" + (repo if repo.endswith(".git") else repo + ".git")
    parts = urlsplit(repo)
    if parts.scheme.lower() not in SCHEMES:
        raise InvalidArgument(
            f"repo {repo!r} is a {parts.scheme or 'schemeless'} URL: a deploy clones over {', '.join(s + '://' for s in SCHEMES)} only"
        )
    if not parts.hostname or parts.path.strip("/") == "":
        raise InvalidArgument(f"repo {repo!r} names no host or no repository: e.g. https://git.example.com/owner/repo.git")
    return repo


def deploy_name(name: str, url: str) -> str:
    """The deploy's name: as given, or the repository's (the URL's last path segment without .git)."""
    if not name:
        name = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"the repository's name {name!r} cannot name the deploy: give a name (1-63 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit)"
            )
        return name
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"name {name!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_branch(branch: str) -> str:
    if not branch:
        return ""
    if branch.startswith("-"):
        raise InvalidArgument(f"branch {branch!r} starts with '-': give a branch name")
    if len(branch) > BRANCH_MAX or _BAD_REF.search(branch) or branch.endswith((".", "/", ".lock")) or branch.startswith("/"):
        raise InvalidArgument(
            f"branch {branch!r} is not a git branch name (at most {BRANCH_MAX} characters; no spaces, '..', '~', '^', "
            "':', '?', '*', '[' or '\\')"
        )
    return branch


def check_working_directory(path: str) -> str:
    """A folder of the repository: relative to its top ("" or "." for the top itself), never outside it."""
    path = path.strip()
    if path.startswith("/"):
        raise InvalidArgument(f"working_directory {path!r} is absolute: give a folder of the repository (e.g. web/app)")
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise InvalidArgument(f"working_directory {path!r} contains a control character")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"working_directory {path!r} leaves the repository ('..'): give a folder inside it")
    return "/".join(parts)


def plan(request: pb.DeployRequest, base: str) -> DeployPlan:
    url = git_url(request.repo, base)
    settings = request.settings
    for field in ("install_command", "build_command", "run_command"):
        validate_text(f"settings.{field}", getattr(settings, field), COMMAND_MAX_BYTES)
    name = deploy_name(request.name.strip(), url)
    return DeployPlan(
        url=url, branch=check_branch(request.branch.strip()), name=name,
        working_directory=check_working_directory(settings.working_directory),
        install=settings.install_command.strip(), build=settings.build_command.strip(), run=settings.run_command.strip(),
        folder=f"/root/{name}",
    )  # fmt: skip


def script(deploy: DeployPlan) -> str:
    """The guest's shell script: clone, install, build (the first failure ends it with its exit code), then
    the run command in a session of its own (setsid) with its output in RUN_LOG, so it outlives this one."""
    q = shlex.quote
    branch = f"--branch {q(deploy.branch)} " if deploy.branch else ""
    top = deploy.folder + (f"/{deploy.working_directory}" if deploy.working_directory else "")
    log = q(deploy.run_log)
    lines = [
        f"printf '==> clone %s%s into %s\\n' {q(deploy.url)} {q(f' ({deploy.branch})' if deploy.branch else '')} {q(deploy.folder)}",
        # A server of git's dumb HTTP protocol (a static file server) cannot clone shallow: from those, whole.
        "err=$(mktemp)",
        f'git clone --depth 1 {branch}-- {q(deploy.url)} {q(deploy.folder)} 2>"$err"; code=$?; cat "$err" >&2',
        'if [ $code -ne 0 ] && grep -q "does not support shallow" "$err"; then',
        f"  rm -rf {q(deploy.folder)}; echo '==> the server cannot clone shallow: cloning the whole history' >&2",
        f"  git clone {branch}-- {q(deploy.url)} {q(deploy.folder)}; code=$?",
        "fi",
        'rm -f "$err"',
        '[ $code -eq 0 ] || { echo "==> clone failed (exit code $code)" >&2; exit $code; }',
        f"cd {q(top)} || exit $?",
    ]
    for step, command in (("install", deploy.install), ("build", deploy.build)):
        if command:
            lines += [
                f"printf '==> {step}: %s\\n' {q(command)}",
                f'sh -c {q(command)} || {{ code=$?; echo "==> {step} failed (exit code $code)" >&2; exit $code; }}',
            ]
    if deploy.run:
        # A run command that ends within a second (a typo, a port in use) is reported with its log; one
        # still running then is left running.
        lines += [
            f"printf '==> run: %s (in the background; output in %s)\\n' {q(deploy.run)} {log}",
            f"mkdir -p {q(deploy.run_log.rsplit('/', 1)[0] or '/')}",
            f"setsid sh -c {q(deploy.run)} </dev/null >>{log} 2>&1 &",
            "pid=$!",
            "sleep 1",
            "if ! kill -0 $pid 2>/dev/null; then wait $pid; code=$?; "
            f'echo "==> the run command ended at once (exit code $code); its output:" >&2; tail -n 20 {log} >&2; '
            "exit $code; fi",
            'echo "==> running (pid $pid)"',
        ]
    lines.append("echo '==> deployed'")
    return "\n".join(lines) + "\n"


class DeployMethods:
    """Methods of OrchestratorServicer (a mixin: `self` is the servicer)."""

    engine: Engine
    store: OrchestratorStore
    # One lock per org: between the name check and the new VM's row, so two deploys of one name cannot both
    # pass (other orgs' deploys never wait on it).
    _deploy_names: dict[str, asyncio.Lock] | None = None

    if TYPE_CHECKING:

        async def _exec_env(self, org_id: str, requested: Mapping[str, str]) -> dict[str, str]: ...  # EnvVarMethods

    async def Deploy(self, request: pb.DeployRequest, context: grpc.aio.ServicerContext) -> pb.DeployResponse:
        settings = self.engine.settings
        deploy = plan(request, settings.deploy_git_base)
        timeout = settings.deploy_timeout_seconds
        if not 0 < timeout <= settings.exec_max_timeout_seconds:
            raise FailedPrecondition(
                f"VERS_DEPLOY_TIMEOUT_SECONDS is {timeout}: it must be between 1 and VERS_EXEC_MAX_TIMEOUT_SECONDS "
                f"({settings.exec_max_timeout_seconds}); the platform's operator sets it"
            )
        org_id = current_principal().org_id
        env = await self._exec_env(org_id, {})
        project_id = str(uuid.uuid4())
        config = request.vm_config
        labels = validate_vm_labels({**dict(config.labels), NAME_LABEL: deploy.name, PROJECT_LABEL: project_id})
        vm_config = VmConfig.of(config, labels)
        if self._deploy_names is None:
            self._deploy_names = {}
        names = self._deploy_names.setdefault(org_id, asyncio.Lock())
        async with names:
            for vm in await self.store.list_vms(org_id):
                if json.loads(vm.labels).get(NAME_LABEL) == deploy.name:
                    raise Conflict(
                        f"a deploy named {deploy.name!r} exists (VM {vm.id}): give another name, or delete that VM first "
                        f"(DELETE /api/v1/vm/{vm.id})"
                    )
            vm = await self.engine.create_root(org_id, vm_config, wait_boot=False)
        try:
            self.engine.execs.start(
                vm, ["sh", "-c", script(deploy)], env=env, stdin=None, working_dir="", timeout_secs=timeout,
                exec_id=project_id,
            )  # fmt: skip
        except Exception:
            await self.engine.delete_vm(vm)  # a deploy that cannot run leaves no VM behind
            raise
        return pb.DeployResponse(project_id=project_id, status="deploying", vm_id=vm.id)
