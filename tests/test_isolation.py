"""Hostile tenants: every REST route of the public API, from the protos' own route table, called by five
callers on one organization's real objects (a repository and its tag, a legacy tag, a commit, a VM, a
domain, an API key, and a public repository for the public surface).

What each caller must get comes from the route's access annotation:
  public_method  answers anyone, token or not;
  admin_method   the administrator only: other keys 403, no key or an unknown one 401;
  ordinary       the owner gets a success or a domain error, never 401, 403 or 404 for its own object; no
                 key or an unknown one 401; another organization, and the administrator (who is an org
                 like any other here), 404 for the owner's object, the same answer as for an object that
                 does not exist, and never a byte of the owner's data.

The two-way streaming routes (console, tunnel) are WebSockets on the gateway: they are called as WebSockets,
the handshake's status being the answer (101 when it opens); the one-way streams (exec output, file
transfers) are plain HTTP, called as any other route. Destructive calls run first for everyone but
the owner, on the owner's real objects, which must come out unchanged; the owner's own run last, on
objects made for the purpose where those are cheap (repositories, tags, domains, keys, orgs) and on the
one VM and commit at the very end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets
from google.protobuf.descriptor import Descriptor

from services.common.interceptor import Access, method_access
from services.gateway.bindings import Binding, all_bindings
from services.gateway.http_streams import is_http_stream
from tests.conftest import Org, Platform, kill_vms_under
from tests.conftest import test_settings as platform_settings

CALLERS = ("owner", "other_org", "no_token", "bad_token", "admin")
STRANGERS = ("other_org", "admin")  # authenticated, but not the owner
# Fields that name one of the owner's objects, by their name in the request messages.
OBJECT_FIELDS = frozenset(
    {
        "vm_id",
        "vm_or_commit_id",
        "commit_id",
        "repo_name",
        "tag_name",
        "org_name",
        "org",
        "domain_id",
        "key_id",
        "ref",
        "source_org",
        "source_repo",
        "source_tag",
        "image_name",
        "base_image_id",
    }
)
# Fields that name an object the call makes: a fresh name each time.
NEW_NAME_FIELDS = frozenset({"name", "label", "domain"})
# Other fields a call needs to get past validation to the lookup of the object.
# (A streamed exec of the owner's VM runs under EXEC_ID; a disk of 1 MiB is refused, but for the owner only.)
EXEC_ID = "5f0c3bde-2b3c-4f7e-9d4a-1c2b3a4d5e6f"
EXAMPLES: dict[str, Any] = {
    "command": ["true"], "state": "Running", "port": 22, "key": "ISOLATION_VAR", "label_name": "isolation",
    "labels": {"isolation": "yes"}, "is_public": False, "fs_size_mib": 1, "path": "/tmp", "exec_id": EXEC_ID,
    "source": {"type": "recipe", "recipe": "default"},
}  # fmt: skip
# A message with `ref` names its commit by exactly one of these.
ALTERNATIVES = ("commit_id", "tag_name", "ref")


@dataclass(frozen=True)
class Route:
    """One binding, with one way of naming the owner's objects."""

    binding: Binding
    variant: str = ""

    @property
    def id(self) -> str:
        name = f"{self.binding.verb} {self.binding.path}"
        return f"{name} [{self.variant}]" if self.variant else name

    @property
    def access(self) -> Access:
        access = method_access(self.binding.grpc_path)
        assert access is not None
        return access

    @property
    def request(self) -> Descriptor:
        return self.binding.method.input_type

    @property
    def fields(self) -> list[str]:
        names = [f.name for f in self.request.fields]
        if self.variant in ALTERNATIVES:
            names = [n for n in names if n not in ALTERNATIVES or n == self.variant or n in self.binding.path_params]
        return names

    @property
    def makes_tag(self) -> bool:
        """A body naming a tag and a commit makes that tag (a repository tag, a legacy one)."""
        fields = set(self.fields)
        return {"tag_name", "commit_id"} <= fields and "tag_name" not in self.binding.path_params and "ref" not in fields

    @property
    def makes_image(self) -> bool:
        """A create or an upload names the image it makes."""
        return self.binding.path.endswith(("/images/create", "/images/upload"))

    @property
    def public_surface(self) -> bool:
        """Routes that name an org: another org's public repository is theirs to read (and fork)."""
        return self.variant in ("public", "private")

    @property
    def mutates(self) -> bool:
        return self.binding.verb != "GET"

    def references(self) -> set[str]:
        """The owner's objects the call names."""
        found = {n for n in self.fields if n in OBJECT_FIELDS and (n in self.binding.path_params or n in self.sent_fields())}
        if self.makes_tag:
            found.discard("tag_name")
        if self.makes_image:
            found.discard("image_name")
        return found

    def sent_fields(self) -> list[str]:
        names = [n for n in self.fields if n in OBJECT_FIELDS or n in NEW_NAME_FIELDS or n in EXAMPLES]
        if "source_repo" in names:
            # a fork's repo_name and tag_name are its target's, in the caller's org: left to their defaults
            names = [n for n in names if n not in ("repo_name", "tag_name")]
        return names


def variants(binding: Binding) -> Iterator[Route]:
    names = {f.name for f in binding.method.input_type.fields}
    if "ref" in names and not names & set(binding.path_params):
        yield from (Route(binding, name) for name in ALTERNATIVES if name in names)
    elif names & {"org_name", "source_org"}:
        yield from (Route(binding, "public"), Route(binding, "private"))
    elif "vm_or_commit_id" in binding.path_params:
        yield from (Route(binding, "vm"), Route(binding, "commit"))
    else:
        yield Route(binding)


ROUTES = [route for binding in all_bindings() for route in variants(binding)]


def test_every_route_of_the_gateway_is_in_the_matrix() -> None:
    """The matrix is the route table itself: a new RPC with a REST path is in it without a word here."""
    assert {(r.binding.verb, r.binding.path) for r in ROUTES} == {(b.verb, b.path) for b in all_bindings()}
    assert len(ROUTES) >= 60


# The objects


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Objects:
    """What a call names: the owner's real objects, objects made for one call, or ones that do not exist."""

    org: Org
    vm: str
    commit: str
    repo: str
    tag: str
    public_repo: str
    public_tag: str
    legacy_tag: str
    domain: str
    key: str
    image: str  # an image of the owner's: its name and its id
    image_id: str
    limits_org: str  # the org the administrator changes the limits of

    def value(self, route: Route, name: str) -> Any:
        if name in EXAMPLES:
            return EXAMPLES[name]
        if name in NEW_NAME_FIELDS or (name == "tag_name" and route.makes_tag) or (name == "image_name" and route.makes_image):
            return fresh("new")
        public = route.variant == "public"
        in_repo = bool({"repo_name", "ref", "org_name", "source_repo"} & set(route.fields))
        values = {
            "vm_id": self.vm,
            "vm_or_commit_id": self.commit if route.variant == "commit" else self.vm,
            "commit_id": self.commit,
            "repo_name": self.public_repo if public else self.repo,
            "source_repo": self.public_repo if public else self.repo,
            "tag_name": (self.public_tag if public else self.tag) if in_repo else self.legacy_tag,
            "source_tag": self.public_tag if public else self.tag,
            "org_name": self.org.name,
            "source_org": self.org.name,
            "org": self.limits_org,
            "domain_id": self.domain,
            "key_id": self.key,
            "ref": f"{self.repo}:{self.tag}",
            "image_name": self.image,
            "base_image_id": self.image_id,
            "host_id": "no-such-host",  # hosts are the administrator's (a single-host platform lists itself alone)
        }
        return values[name]

    def ghosts(self) -> Objects:
        """The same shapes, naming nothing that exists (the org stays: a ghost repository of a real org)."""
        ids = {name: str(uuid.uuid4()) for name in ("vm", "commit", "domain", "key", "image_id")}
        names = {name: fresh("ghost") for name in ("repo", "tag", "public_repo", "public_tag", "legacy_tag", "image")}
        return Objects(org=self.org, limits_org=self.limits_org, **ids, **names)

    def secrets(self) -> set[str]:
        """What no other caller may ever read."""
        return {self.vm, self.commit, self.repo, self.tag, self.legacy_tag, self.domain, self.key, self.image, self.image_id, self.org.id}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, Any]
    body: dict[str, Any] | None

    def sent(self) -> str:
        return json.dumps([self.path, self.query, self.body])


def build(route: Route, objects: Objects) -> Request:
    binding = route.binding
    path = binding.path
    for name in binding.path_params:
        path = path.replace("{" + name + "}", str(objects.value(route, name)))
    extra = {n: objects.value(route, n) for n in route.sent_fields() if n not in binding.path_params}
    if binding.body == "*":
        return Request(binding.verb, path, {}, extra)
    return Request(binding.verb, path, {k: v for k, v in extra.items() if not isinstance(v, list)}, None)


# The platform and the callers


@dataclass
class Answer:
    status: int
    text: str

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return None


@dataclass
class World:
    platform: Platform
    owner: Org
    other: Org
    objects: Objects
    tokens: dict[str, str | None] = field(default_factory=dict)

    async def call(self, caller: str, route: Route, request: Request) -> Answer:
        token = self.tokens[caller]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if route.binding.streaming and not is_http_stream(route.binding):
            return await self._handshake(request, headers)
        async with httpx.AsyncClient(base_url=self.platform.url, headers=headers, timeout=180) as http:
            answer = await http.request(request.method, request.path, params=request.query, json=request.body)
        return Answer(answer.status_code, answer.text)

    async def _handshake(self, request: Request, headers: dict[str, str]) -> Answer:
        url = self.platform.url.replace("http://", "ws://") + request.path + str(httpx.URL("", params=request.query))
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=60):
                return Answer(101, "")
        except websockets.InvalidStatus as refused:
            return Answer(refused.response.status_code, refused.response.body.decode(errors="replace") if refused.response.body else "")

    async def as_owner(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with self.platform.client(self.owner) as http:
            return await http.request(method, path, **kwargs)

    async def remove_vms_made_by(self, caller: str, answer: Answer) -> None:
        """A stranger's call that made VMs in its own org (new_root) leaves nothing running behind it."""
        body = answer.json()
        if not (200 <= answer.status < 300 and isinstance(body, dict)):
            return
        made = [body.get("vm_id")] + [vm.get("vm_id") for vm in body.get("vms") or [] if isinstance(vm, dict)]
        async with httpx.AsyncClient(
            base_url=self.platform.url, headers={"Authorization": f"Bearer {self.tokens[caller]}"}, timeout=180
        ) as http:
            for vm in filter(None, made):
                await http.delete(f"/api/v1/vm/{vm}")


async def make_objects(platform: Platform, owner: Org) -> Objects:
    async with platform.client(owner) as http:

        async def ok(answer: httpx.Response) -> Any:
            assert answer.status_code < 300, f"{answer.request.method} {answer.request.url}: {answer.status_code} {answer.text}"
            return answer.json() if answer.content else None

        vm = (await ok(await http.post("/api/v1/vm/new_root", params={"wait_boot": "true"}, json={"vm_config": {}})))["vm_id"]
        commit = (await ok(await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "isolation"})))["commit_id"]
        repo, tag, public_repo, public_tag, legacy = (fresh(p) for p in ("repo", "tag", "pub", "pubtag", "legacy"))
        for name, tag_name, public in ((repo, tag, False), (public_repo, public_tag, True)):
            await ok(await http.post("/api/v1/repositories", json={"name": name}))
            await ok(await http.patch(f"/api/v1/repositories/{name}/visibility", json={"is_public": public}))
            await ok(await http.post(f"/api/v1/repositories/{name}/tags", json={"tag_name": tag_name, "commit_id": commit}))
        await ok(await http.post("/api/v1/commit_tags", json={"tag_name": legacy, "commit_id": commit}))
        domain = (await ok(await http.post("/api/v1/domains", json={"domain": fresh("dom"), "vm_id": vm, "port": 80})))["domain_id"]
        key = (await ok(await http.post("/api/v1/keys", json={"label": "isolation"})))["api_key"]["id"]
        # the org's variable that DELETE /env_vars/{key} names (EXAMPLES): every org has its own set
        await ok(await http.put("/api/v1/env_vars", json={"vars": {EXAMPLES["key"]: "owner's value"}}))
        # the streamed exec AttachExecStream names (EXAMPLES)
        async with http.stream("POST", f"/api/v1/vm/{vm}/exec/stream", json={"command": ["true"], "exec_id": EXEC_ID}) as streamed:
            assert streamed.status_code == 200 and b'"exit"' in await streamed.aread()
        image, image_id = await new_image(http.request)
    return Objects(owner, vm, commit, repo, tag, public_repo, public_tag, legacy, domain, key, image, image_id, limits_org=owner.name)


async def new_image(call: Callable[..., Awaitable[httpx.Response]]) -> tuple[str, str]:
    """An image of the owner's, built from the default recipe (a few seconds): its name and its id."""
    name = fresh("img")
    made = await call("POST", "/api/v1/images/create", json={"image_name": name, "source": EXAMPLES["source"]})
    assert made.status_code == 201, made.text
    for _ in range(600):
        status = (await call("GET", f"/api/v1/images/{name}/status")).json()["status"]
        if status != "creating":
            break
        await asyncio.sleep(0.1)
    assert status == "completed", status
    listed = (await call("GET", "/api/v1/images")).json()["images"]
    return name, next(image["base_image_id"] for image in listed if image["image_name"] == name)


async def throwaways(world: World, route: Route) -> Objects:
    """Cheap objects of the owner for one destructive call of its own, only those the call names; the VM
    and the commit stay the real ones."""
    objects, names = world.objects, route.references()
    changes: dict[str, str] = {}
    if names & {"repo_name", "ref", "source_repo"} and route.variant != "public":
        changes["repo"], changes["tag"] = fresh("repo"), fresh("tag")
        await world.as_owner("POST", "/api/v1/repositories", json={"name": changes["repo"]})
        await world.as_owner(
            "POST", f"/api/v1/repositories/{changes['repo']}/tags", json={"tag_name": changes["tag"], "commit_id": objects.commit}
        )
    elif "tag_name" in names:
        changes["legacy_tag"] = fresh("legacy")
        await world.as_owner("POST", "/api/v1/commit_tags", json={"tag_name": changes["legacy_tag"], "commit_id": objects.commit})
    if "domain_id" in names:
        answer = await world.as_owner("POST", "/api/v1/domains", json={"domain": fresh("dom"), "vm_id": objects.vm})
        changes["domain"] = answer.json()["domain_id"]
    if "base_image_id" in names:
        changes["image"], changes["image_id"] = await new_image(world.as_owner)
    if "key_id" in names:
        changes["key"] = (await world.as_owner("POST", "/api/v1/keys", json={"label": "throwaway"})).json()["api_key"]["id"]
    if "org" in names:
        changes["limits_org"] = (await world.platform.new_org("limits")).name
    return dataclasses.replace(objects, **changes)


async def owner_snapshot(world: World) -> dict[str, Any]:
    """Every read of the owner's objects, to compare before and after the strangers' calls."""
    seen = {}
    for route in ROUTES:
        if route.mutates or route.binding.streaming:
            continue
        request = build(route, world.objects)
        answer = await world.call("owner", route, request)
        body = answer.json()
        if route.binding.path == "/api/v1/images" and answer.status == 200:
            # the list shows public images beside the org's own: the administrator's (the `vers` organization's)
            # are public, so an image it made in the matrix is listed, and counted; the owner's are compared
            own = [image for image in body["images"] if image["owner_id"] == world.objects.org.id]
            body = {**body, "images": own, "total": len(own)}
        seen[route.id] = (answer.status, body)
    return seen


# The expectations


@dataclass(frozen=True)
class Finding:
    route: str
    caller: str
    status: int
    problem: str

    def __str__(self) -> str:
        return f"{self.route} as {self.caller}: {self.status}: {self.problem}"


def success(status: int) -> bool:
    return 200 <= status < 300 or status == 101


def judge(route: Route, caller: str, request: Request, answer: Answer, objects: Objects, ghost: tuple[Answer, Objects] | None) -> list[str]:
    """What is wrong with `answer`; nothing when the caller got what its access allows."""
    status = answer.status
    problems = []
    if status >= 500:
        problems.append(f"server error: {answer.text[:300]}")
    if caller != "owner" and not (caller == "admin" and route.access is Access.ADMIN):  # the admin sees every org
        secrets = objects.secrets() - ({objects.commit} if route.variant == "public" else set())
        leaked = sorted(s for s in secrets if s in answer.text and s not in request.sent())
        if leaked:
            problems.append(f"the answer carries the owner's {leaked}: {answer.text[:300]}")
    if route.access is Access.PUBLIC:
        if status in (401, 403):
            problems.append("a public method refused a caller")
    elif caller in ("no_token", "bad_token"):
        if status != 401:
            problems.append("expected 401 without a valid key")
    elif route.access is Access.ADMIN:
        if caller == "admin" and not success(status):
            problems.append(f"the administrator was refused: {answer.text[:200]}")
        if caller != "admin" and status != 403:
            problems.append("expected 403: only the administrator may call it")
    elif route.public_surface:
        expect_found = route.variant == "public"
        if expect_found and status in (401, 403, 404):
            problems.append(f"a public repository is everyone's to read: {answer.text[:200]}")
        if not expect_found and status != 404:
            problems.append("a private repository is 404 on the public surface, to everyone")
    elif caller == "owner":
        if status in (401, 403) or (status == 404 and route.references()):
            problems.append(f"the owner was refused its own object: {answer.text[:200]}")
    elif route.references():
        # A list filtered by an object (GET /domains?vm_id=) may answer as it does for an object that does
        # not exist (an empty list) instead of 404: alike, word for word, it says nothing either.
        filters_only = route.binding.verb == "GET" and not route.references() & set(route.binding.path_params)
        if filters_only and ghost is not None and success(status) and same_refusal(answer, ghost[0], objects, ghost[1]):
            pass
        elif status != 404:
            problems.append("expected 404: the object is another organization's")
        elif ghost is not None and not same_refusal(answer, ghost[0], objects, ghost[1]):
            problems.append(f"the refusal differs from one for an object that does not exist: {answer.text[:200]} / {ghost[0].text[:200]}")
    elif status in (401, 403):
        problems.append(f"an authenticated org was refused a call on its own org: {answer.text[:200]}")
    return problems


_FRESH = re.compile(r"new-[0-9a-f]{10}")


def same_refusal(answer: Answer, ghost: Answer, objects: Objects, ghosts: Objects) -> bool:
    """Refused alike, word for word once the names the caller sent are put aside: no oracle of existence."""

    def plain(answer: Answer, named: Objects) -> tuple[int, str]:
        text = _FRESH.sub("NEW", answer.text)
        for kind in ("vm", "commit", "repo", "tag", "public_repo", "public_tag", "legacy_tag", "domain", "key", "image", "image_id"):
            text = text.replace(getattr(named, kind), kind.upper())
        return answer.status, text

    return plain(answer, objects) == plain(ghost, ghosts)


# The matrix run


@dataclass
class Matrix:
    answers: dict[tuple[str, str], Answer]
    findings: list[Finding]
    snapshot_before: dict[str, Any]
    snapshot_after: dict[str, Any]
    intact: list[str]


async def run_matrix(world: World) -> Matrix:
    answers: dict[tuple[str, str], Answer] = {}
    findings: list[Finding] = []

    async def record(route: Route, caller: str, objects: Objects, ghost_objects: Objects | None) -> None:
        request = build(route, objects)
        answer = await world.call(caller, route, request)
        if caller != "owner":
            await world.remove_vms_made_by(caller, answer)
        ghost = None
        if ghost_objects is not None:
            ghost = (await world.call(caller, route, build(route, ghost_objects)), ghost_objects)
        answers[(route.id, caller)] = answer
        problems = judge(route, caller, request, answer, objects, ghost)
        findings.extend(Finding(route.id, caller, answer.status, problem) for problem in problems)

    before = await owner_snapshot(world)
    # Everyone but the owner, on the owner's real objects: all of it must be refused or harmless.
    for route in ROUTES:
        for caller in CALLERS[1:]:
            objects = world.objects
            if caller == "admin" and route.access is Access.ADMIN and route.mutates:
                objects = await throwaways(world, route)
            ghosts = objects.ghosts() if caller in STRANGERS and route.access is Access.ORG and route.references() else None
            await record(route, caller, objects, ghosts)
    after = await owner_snapshot(world)
    intact = [r for r in before if before[r] != after[r]]
    # The owner: reads first, then its changes on throwaway objects, then the VM and commit themselves.
    for route in sorted(ROUTES, key=owner_order):
        objects = await throwaways(world, route) if route.mutates else world.objects
        await record(route, "owner", objects, None)
    return Matrix(answers, findings, before, after, intact)


def owner_order(route: Route) -> tuple[int, int, int]:
    real = route.references() & {"vm_id", "vm_or_commit_id", "commit_id"}
    deletes_vm = route.binding.verb == "DELETE" and route.binding.path == "/api/v1/vm/{vm_id}"
    return (int(route.mutates), int(bool(real) and route.binding.verb == "DELETE"), int(deletes_vm))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def matrix(images: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Matrix]:
    settings = platform_settings(tmp_path_factory.mktemp("vers-isolation")).model_copy(
        update={
            # one VM per org: the owner's creates and branches end at the limit, not in new VMs
            "org_max_vcpus": 1,
            "org_max_memory_mib": 256,
            # the matrix makes a few hundred calls, many without a valid key, from one address
            "rate_limit_per_second": 10_000.0,
            "rate_limit_burst": 100_000,
            "auth_failures_per_minute": 100_000,
        }
    )
    platform = await Platform.start(settings)
    try:
        owner, other = await platform.new_org("owner"), await platform.new_org("other")
        objects = await make_objects(platform, owner)
        world = World(platform, owner, other, objects)
        world.tokens = {
            "owner": owner.key,
            "other_org": other.key,
            "no_token": None,
            "bad_token": "vers_" + uuid.uuid4().hex * 2,
            "admin": platform.admin_key,
        }
        yield await run_matrix(world)
    finally:
        kill_vms_under(platform.settings.vm_run_dir)
        await asyncio.sleep(0.3)
        await platform.stop()


# Known refusals that leak, each to be fixed in the file named; strict, so the case turns red once fixed.
KNOWN: dict[tuple[str, str], str] = {}


def cases() -> list[Any]:
    found = []
    for route in ROUTES:
        for caller in CALLERS:
            reason = KNOWN.get((route.id, caller))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            found.append(pytest.param(route.id, caller, marks=marks, id=f"{route.id}-{caller}"))
    return found


@pytest.mark.parametrize(("route", "caller"), cases())
def test_route_answers_each_caller_as_its_access_says(matrix: Matrix, route: str, caller: str) -> None:
    assert (route, caller) in matrix.answers
    problems = [f for f in matrix.findings if (f.route, f.caller) == (route, caller)]
    assert not problems, "\n".join(map(str, problems))


def table(matrix: Matrix) -> str:
    rows = [f"{'route':<72} " + " ".join(f"{caller:>9}" for caller in CALLERS)]
    for route in ROUTES:
        rows.append(f"{route.id:<72} " + " ".join(f"{matrix.answers[(route.id, c)].status:>9}" for c in CALLERS))
    return "\n".join(rows)


def test_no_leaks(matrix: Matrix) -> None:
    """The whole matrix at once: every (route, caller, status) that leaks or refuses wrongly, beyond the known
    ones above (each of which fails in its own case once fixed)."""
    print(table(matrix))
    print(f"{len(ROUTES)} routes x {len(CALLERS)} callers = {len(matrix.answers)} calls")
    print("known:", *(f"\n  {f}" for f in matrix.findings if (f.route, f.caller) in KNOWN))
    unknown = [f for f in matrix.findings if (f.route, f.caller) not in KNOWN]
    assert not unknown, f"{len(unknown)} leaks in {len(matrix.answers)} calls:\n" + "\n".join(map(str, unknown))


def test_strangers_leave_the_owners_objects_as_they_were(matrix: Matrix) -> None:
    """Every read of the owner's, before and after everyone else's calls (deletes, moves, state changes
    included): the same answers, word for word."""
    assert len(matrix.snapshot_before) >= 30
    assert not matrix.intact, "\n".join(f"{r}: {matrix.snapshot_before[r]} -> {matrix.snapshot_after[r]}" for r in matrix.intact)
