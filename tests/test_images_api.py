"""Images through the API (vm-api-more.md §9), driven by the official SDK `vers-sdk` 1.20.0 unchanged where it
can send the request (its upload_image sends JSON; the multipart form the hosted service takes goes through
httpx): upload a small root file system, watch its status, boot a VM from it, and the rules around it
(names, other organizations, images in use, sources this platform cannot reach)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import inspect
import io
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from vers_sdk import BadRequestError, ConflictError, NotFoundError, VersSdkClient
from vers_sdk import models as M

from services.bake.disk import Built
from services.bake.pipeline import upload
from services.client import ApiClient
from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

# vm-api-more.md §9, in its order.
METHODS = ("list_images", "get_image_status", "create_image", "upload_image", "delete_image")
MARKER = b"made from an uploaded root\n"


def add(
    archive: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, uid: int = 0, link: str = ""
) -> None:
    member = tarfile.TarInfo(name)
    member.type, member.mode, member.uid, member.gid, member.linkname, member.size = kind, mode, uid, uid, link, len(data)
    archive.addfile(member, io.BytesIO(data) if data else None)


def tar_of(*members: tuple[str, bytes, bytes, str]) -> bytes:
    """A tar of (name, type, data, link name) members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, kind, data, link in members:
            add(archive, name, kind, data, 0o777 if kind == tarfile.SYMTYPE else 0o644, link=link)
    return out.getvalue()


def root_tar() -> bytes:
    """A tar of a tiny root file system: static busybox with its applets (what the Vers init needs), a file
    of another user, a setuid program (and a hard link to it) and a sticky folder, as a real root has."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for folder in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "root", "srv"):
            add(archive, folder, tarfile.DIRTYPE, mode=0o755)
        add(archive, "tmp", tarfile.DIRTYPE, mode=0o1777)
        add(archive, "bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755)
        applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "bin/busybox" and applet.split("/")[0] in ("bin", "sbin", "usr"):
                add(archive, applet, tarfile.SYMTYPE, link="/bin/busybox")
        add(archive, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/srv:/bin/sh\n")
        add(archive, "etc/group", data=b"root:x:0:\nuser:x:1000:\n")
        add(archive, "srv/marker", data=MARKER, mode=0o640, uid=1000)
        add(archive, "usr/bin/setuid-tool", data=b"#!/bin/sh\n", mode=0o4755)
        add(archive, "usr/bin/setuid-link", tarfile.LNKTYPE, mode=0o4755, link="usr/bin/setuid-tool")
        add(archive, "dev/null", tarfile.CHRTYPE, mode=0o666)  # left out: the guest's /dev is a devtmpfs
    return out.getvalue()


class World:
    def __init__(self, platform: Platform, org: Org, other: Org, sdk: VersSdkClient, stranger: VersSdkClient) -> None:
        self.platform, self.org, self.other, self.sdk, self.stranger = platform, org, other, sdk, stranger
        self.uploaded: dict[str, str] = {}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(platform: Platform) -> AsyncIterator[World]:
    org, other = await platform.new_org("images"), await platform.new_org("images-other")
    async with (
        VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0) as sdk,
        VersSdkClient(base_url=platform.url, api_key=other.key, max_retries=0) as stranger,
    ):
        yield World(platform, org, other, sdk, stranger)


async def wait_built(sdk: VersSdkClient, name: str) -> dict[str, object]:
    for _ in range(600):
        status = await sdk.get_image_status(name)
        if status["status"] != "creating":
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"image {name} still creating")


def test_every_method_of_the_spec_is_here_and_in_the_sdk() -> None:
    tested = {name.removeprefix("test_") for name, _ in inspect.getmembers(sys.modules[__name__], inspect.iscoroutinefunction)}
    for method in METHODS:
        assert callable(getattr(VersSdkClient, method)), method
        assert method in tested, f"no test_{method}"


async def test_upload_image(world: World) -> None:
    tar = root_tar()
    # What the SDK can send: JSON, the tar in base64.
    body = {"image_name": "tiny", "size_mib": 512, "description": "busybox", "tarball_b64": base64.b64encode(tar).decode()}
    made = await world.sdk.upload_image(body)
    assert made["image_name"] == "tiny" and made["status"] == "creating" and made["job_id"]
    # The hosted service's form: multipart/form-data, the name and size in the query string.
    async with world.platform.client(world.org) as http:
        answer = await http.post(
            "/api/v1/images/upload", params={"image_name": "tiny-form", "size_mib": 600}, files={"tarball": ("root.tar", tar)}
        )
        assert answer.status_code == 201, answer.text
        missing = await http.post("/api/v1/images/upload", params={"image_name": "no-file"}, files={"other": ("x", b"x")})
        assert missing.status_code == 400 and "Use field name 'file' or 'tarball'" in missing.json()["error"]
    assert await wait_built(world.sdk, "tiny") == {"image_name": "tiny", "size_mib": 512, "status": "completed", "error_message": None}
    assert (await wait_built(world.sdk, "tiny-form"))["size_mib"] == 600

    # A name the org has is a conflict, while creating or after; another org may use it.
    with pytest.raises(ConflictError):
        await world.sdk.upload_image(body)
    with pytest.raises(BadRequestError, match="size_mib"):
        await world.sdk.upload_image({**body, "image_name": "small", "size_mib": 100})
    with pytest.raises(BadRequestError, match="not a tar"):
        await world.sdk.upload_image({**body, "image_name": "broken", "tarball_b64": base64.b64encode(b"not a tar").decode()})
    # Bad metadata in a JSON body is refused before its tar is stored.
    with pytest.raises(BadRequestError, match="size_mib"):
        await world.sdk.upload_image({**body, "image_name": "odd-size", "size_mib": "big"})
    with pytest.raises(BadRequestError, match="description"):
        await world.sdk.upload_image({**body, "image_name": "long", "description": "x" * 5000})
    for name in ("broken", "odd-size", "long"):  # no record is left of a refused upload
        with pytest.raises(NotFoundError):
            await world.sdk.get_image_status(name)
    assert not [p for p in (world.platform.settings.data_dir / "org-images").iterdir() if p.name.startswith(".upload-")]


async def test_get_image_status(world: World) -> None:
    assert (await world.sdk.get_image_status("default"))["status"] == "completed"
    with pytest.raises(NotFoundError):
        await world.sdk.get_image_status("never-made")
    with pytest.raises(NotFoundError):  # another org's image is not there for others
        await world.stranger.get_image_status("tiny")


async def test_list_images(world: World) -> None:
    listed = await world.sdk.list_images()
    names = [image["image_name"] for image in listed["images"]]
    assert listed["total"] == len(names) and listed["offset"] == 0 and listed["limit"] == 50
    assert names[0] == "default" and {"tiny", "tiny-form"} <= set(names) and "broken" not in names
    tiny = next(image for image in listed["images"] if image["image_name"] == "tiny")
    assert tiny["owner_id"] == world.org.id and tiny["is_public"] is False and tiny["source_type"] == "upload"
    assert tiny["size_mib"] == 512 and tiny["description"] == "busybox" and tiny["created_at"]
    builtin = listed["images"][0]
    assert builtin["is_public"] is True and builtin["source_type"] == "builtin"
    strangers = [image["image_name"] for image in (await world.stranger.list_images())["images"]]
    assert "default" in strangers and "tiny" not in strangers


def debugfs(disk: Path, folder: Path, command: str) -> str:
    raw = folder / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    try:
        return subprocess.run(["debugfs", "-R", command, str(raw)], capture_output=True, text=True, check=True).stdout
    finally:
        raw.unlink()


async def test_the_disk_keeps_owners_and_modes_and_boots(world: World, tmp_path: Path) -> None:
    image = next(i for i in (await world.sdk.list_images())["images"] if i["image_name"] == "tiny")
    disk = world.platform.settings.data_dir / "org-images" / image["base_image_id"] / "rootfs.qcow2"
    stat = debugfs(disk, tmp_path, "stat /srv/marker")
    assert "User:  1000" in stat and "Mode:  0640" in stat, stat
    setuid = debugfs(disk, tmp_path, "stat /usr/bin/setuid-tool")
    assert "Mode:  04755" in setuid and "Links: 2" in setuid, setuid  # the mode from the tar, set inside the image
    assert setuid.split()[1] == debugfs(disk, tmp_path, "stat /usr/bin/setuid-link").split()[1]  # one inode
    assert "Mode:  01777" in debugfs(disk, tmp_path, "stat /tmp")

    vm = await world.sdk.create_new_root_vm({"vm_config": {"image_name": "tiny"}}, M.CreateNewRootVmParams(wait_boot=True))
    try:
        ran = await world.sdk.exec_vm(vm["vm_id"], {"command": ["sh", "-c", "cat /srv/marker; stat -c '%u %a' /srv/marker"]})
        assert ran["stdout"] == MARKER.decode() + "1000 640\n", ran
        # Another org cannot boot from it: to them it does not exist.
        with pytest.raises(BadRequestError, match="image 'tiny' does not exist"):
            await world.stranger.create_new_root_vm({"vm_config": {"image_name": "tiny"}})
        with pytest.raises(ConflictError, match="in use"):
            await world.sdk.delete_image(image["base_image_id"])
    finally:
        await world.sdk.delete_vm(vm["vm_id"])
    world.uploaded["tiny"] = image["base_image_id"]


async def test_create_image(world: World) -> None:
    made = await world.sdk.create_image({"image_name": "from-recipe", "source": {"type": "recipe", "recipe": "default"}, "size_mib": 0})
    assert made["status"] == "creating"
    built = await wait_built(world.sdk, "from-recipe")
    assert built["status"] == "completed" and int(built["size_mib"]) > 0  # type: ignore[call-overload]
    with pytest.raises(ConflictError):
        await world.sdk.create_image({"image_name": "from-recipe", "source": {"type": "recipe", "recipe": "default"}})
    # The hosted service's sources need a registry or a bucket: refused, saying what works here.
    for source in ({"type": "docker", "image_ref": "debian:stable"}, {"type": "s3", "bucket": "b", "key": "k"}):
        with pytest.raises(BadRequestError, match="not available on this platform") as refused:
            await world.sdk.create_image({"image_name": "elsewhere", "source": source})
        assert "/api/v1/images/upload" in refused.value.error_message
    with pytest.raises(BadRequestError, match="recipe"):
        await world.sdk.create_image({"image_name": "odd", "source": {"type": "recipe", "recipe": "nope"}})
    with pytest.raises(BadRequestError, match="image_name"):
        await world.sdk.create_image({"image_name": "a/b", "source": {"type": "recipe", "recipe": "default"}})


async def test_delete_image(world: World) -> None:
    listed = {i["image_name"]: i for i in (await world.sdk.list_images())["images"]}
    tiny = listed["tiny"]["base_image_id"]
    with pytest.raises(NotFoundError):  # another org's image: 404, never 403
        await world.stranger.delete_image(tiny)
    with pytest.raises(NotFoundError):
        await world.sdk.delete_image("00000000-0000-4000-8000-000000000000")
    with pytest.raises(BadRequestError, match="built with the platform"):
        await world.sdk.delete_image(listed["default"]["base_image_id"])
    assert await world.sdk.delete_image(tiny) == {"base_image_id": tiny, "deleted": True}
    with pytest.raises(NotFoundError):
        await world.sdk.get_image_status("tiny")
    assert not (world.platform.settings.data_dir / "org-images" / tiny).exists()
    # The name is free again.
    body = {"image_name": "tiny", "size_mib": 512, "tarball_b64": base64.b64encode(root_tar()).decode()}
    assert (await world.sdk.upload_image(body))["status"] == "creating"
    assert (await wait_built(world.sdk, "tiny"))["status"] == "completed"


async def test_the_baker_uploads_its_root_through_the_api(world: World, tmp_path: Path) -> None:
    """The image baker is a client of the API: its root goes up as a raw tar, once; a second bake reuses it."""
    tarball = tmp_path / "root.tar"
    tarball.write_bytes(root_tar())
    built = Built("baked-0123abcd", tarball, {"disk_mib": 100, "contents": "a tiny root"})
    client = ApiClient(world.platform.url, world.org.key)
    try:
        assert await asyncio.to_thread(upload, client, built, lambda line: None) is True
        assert await asyncio.to_thread(upload, client, Built(built.name, None, built.manifest), lambda line: None) is False
    finally:
        client.close()
    status = await world.sdk.get_image_status(built.name)
    assert status["status"] == "completed" and status["size_mib"] == 512  # the API's smallest disk


async def test_uploads_that_reach_outside_the_image_are_refused(world: World, tmp_path: Path) -> None:
    """Every member is checked before anything is unpacked: links and paths that lead out of the image, names
    given twice, compressed or oversized uploads are refused with a 400 naming the member, and nothing outside
    the build folder is created, linked or changed."""
    data = world.platform.settings.data_dir
    canary = data / "canary.secret"
    canary.write_text("the platform's secret\n")
    outside = tmp_path / "outside"
    R, D, S, L = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    oversized = io.BytesIO()
    with tarfile.open(fileobj=oversized, mode="w") as archive:  # a header saying 513 MiB: refused before its data is read
        member = tarfile.TarInfo("huge")
        member.size = 513 * 1024 * 1024
        archive.addfile(member)
    uploads = {
        "absolute hard link": (tar_of(("x", L, b"", str(canary)), ("x", R, b"overwritten", "")), "outside the root"),
        "hard link with ..": (tar_of(("etc", D, b"", ""), ("etc/x", L, b"", "../../../canary.secret")), "outside the root"),
        "hard link to nothing given": (tar_of(("x", L, b"", "canary.secret")), "not an earlier regular file"),
        "file through a link": (tar_of(("d", S, b"", str(tmp_path)), ("d/outside", R, b"written", "")), "not a folder"),
        "name given twice": (tar_of(("a", R, b"1", ""), ("./a", R, b"2", "")), "a second time"),
        "name with ..": (tar_of(("etc/../../../canary.secret", R, b"overwritten", "")), "outside the root"),
        "absolute name": (tar_of((str(canary), R, b"overwritten", "")), "outside the root"),
        "compressed": (gzip.compress(root_tar()), "gzip-compressed: send a plain"),
        "files beyond size_mib": (oversized.getvalue(), "more than the disk's 512 MiB"),
    }
    async with world.platform.client(world.org) as http:
        for number, (case, (tar, expected)) in enumerate(uploads.items()):
            answer = await http.post(
                "/api/v1/images/upload",
                params={"image_name": f"escape-{number}", "size_mib": 512},
                content=tar,
                headers={"content-type": "application/x-tar"},
            )
            assert answer.status_code == 400 and expected in answer.json()["error"], (case, answer.text)
            assert (await http.get(f"/api/v1/images/escape-{number}/status")).status_code == 404, case
    assert canary.read_text() == "the platform's secret\n" and canary.stat().st_nlink == 1
    assert not outside.exists()
    assert not [p for p in (data / "org-images").iterdir() if p.name.startswith(".")]


def processes_naming(folder: Path) -> list[int]:
    """The processes whose command line names `folder` (a build's names its image's folder)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(folder).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


async def test_a_build_over_its_time_is_stopped(world: World) -> None:
    """A build runs in a process of its own: past VERS_IMAGE_BUILD_TIMEOUT_SECONDS it is killed (with the
    programs it runs), the image fails saying why, and no disk is installed for it."""
    settings = world.platform.settings
    timeout = settings.image_build_timeout_seconds
    settings.image_build_timeout_seconds = 0
    try:
        body = {"image_name": "too-slow", "size_mib": 512, "tarball_b64": base64.b64encode(root_tar()).decode()}
        assert (await world.sdk.upload_image(body))["status"] == "creating"
        failed = await wait_built(world.sdk, "too-slow")
    finally:
        settings.image_build_timeout_seconds = timeout
    assert failed["status"] == "failed" and "VERS_IMAGE_BUILD_TIMEOUT_SECONDS (0 s)" in str(failed["error_message"])
    image = next(i for i in (await world.sdk.list_images())["images"] if i["image_name"] == "too-slow")
    folder = settings.data_dir / "org-images" / image["base_image_id"]
    assert not processes_naming(folder) and not folder.exists()
    await asyncio.sleep(0.5)
    assert not folder.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(".build-")]
    await world.sdk.delete_image(image["base_image_id"])
