"""The commit store (VERS_COMMIT_STORE): the shared folder's implementation on real qcow2 chains, without VMs,
and a platform whose commits go to a shared folder: a commit is whole in the store when its call answers, a host
without the commit's files copies them from the store and branches it where the guest was, a damaged store file
is refused, and a deleted commit leaves the store."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError

from services.common.errors import DataLoss
from services.common.settings import Settings
from services.orchestrator.commitstore import (
    CHECKSUMS_FILE,
    PART,
    STALE_PART_SECONDS,
    LocalCommitStore,
    SharedPathCommitStore,
    Stored,
    open_commit_store,
)  # fmt: skip
from services.orchestrator.layout import Layout
from services.orchestrator.machine import DISK_FDSET, LaunchSpec, qcow2_backing, qemu_args, relative_backing
from tests import conftest
from tests.conftest import Org, Platform, discard, kill_vms_under
from tests.test_fsck import backdate, fsck
from tests.test_vms import COUNTER, counter, counter_above, new_vm, out

# Units: the stores on files


def qemu_img(*args: str | Path) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True).stdout


def host(tmp_path: Path, name: str, store: Path | None) -> Layout:
    layout = Layout(data=tmp_path / name, images=tmp_path / "images", run=tmp_path / f"{name}-run", store=store)
    for folder in (layout.layers, layout.commits):
        folder.mkdir(parents=True, exist_ok=True)
    return layout


def shared_hosts(tmp_path: Path) -> tuple[Layout, Layout, SharedPathCommitStore, SharedPathCommitStore]:
    """Hosts A and B with one shared commit store folder (A's prepared), and each one's store."""
    store = tmp_path / "store"
    store.mkdir()
    a, b = host(tmp_path, "host-a", store), host(tmp_path, "host-b", store)
    shared_a, shared_b = SharedPathCommitStore(a), SharedPathCommitStore(b)
    shared_a.prepare()
    return a, b, shared_a, shared_b


def make_commit(layout: Layout, base: Path) -> tuple[str, list[str]]:
    """A commit as the engine leaves it in a host's data folder: a chain of two layers on an image's root disk
    (the lower one named by absolute path, the upper by its name alone), and a folder with state and memory."""
    lower, upper = "layer-lower", "layer-upper"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", layout.layer_file(lower))
    qemu_img("create", "-q", "-f", "qcow2", "-b", f"{lower}.qcow2", "-F", "qcow2", layout.layer_file(upper))
    folder = layout.commit_folder("commit-1")
    folder.mkdir()
    (folder / "state").write_bytes(os.urandom(4096))
    with (folder / "ram").open("wb") as ram:
        ram.truncate(64 << 20)  # sparse, as a guest's untouched memory
        ram.write(b"touched")
    return "commit-1", [upper, lower]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    disk = tmp_path / "images" / "rootfs.qcow2"
    disk.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", disk, "64M")
    return disk


def test_a_published_commit_is_whole_in_the_store_and_another_host_fetches_a_working_chain(tmp_path: Path, base: Path) -> None:
    a, b, shared_a, shared_b = shared_hosts(tmp_path)
    commit_id, chain = make_commit(a, base)

    shared_a.publish(commit_id, chain, json.dumps({"files": {}}))
    assert {p.name for p in a.store_layers.iterdir()} == {f"{layer}.qcow2" for layer in chain}
    assert {p.name for p in a.store_commit_folder(commit_id).iterdir()} == {"state", "ram", CHECKSUMS_FILE}
    assert (a.store_commit_folder(commit_id) / "state").read_bytes() == (a.commit_folder(commit_id) / "state").read_bytes()
    assert not [p for p in (tmp_path / "store").rglob(f"*{PART}*")], "no partial file is left"
    assert shared_a.stored() == Stored(frozenset({commit_id}), frozenset(chain))
    # the memory file keeps its holes in the store
    assert (a.store_commit_folder(commit_id) / "ram").stat().st_blocks * 512 < 1 << 20

    assert shared_b.fetch(commit_id, chain) is True
    assert shared_b.fetch(commit_id, chain) is False, "a second fetch finds everything here"
    assert (b.commit_folder(commit_id) / "ram").read_bytes()[:7] == b"touched"
    # the chain in host B's folder stands on host B's layers and on the image's root disk (absolute, the same everywhere)
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", b.layer_file(chain[0])))
    assert [image["filename"] for image in info] == [str(b.layer_file(chain[0])), str(b.layer_file(chain[1])), str(base)]
    assert relative_backing(b.layer_file(chain[0])) == b.layer_file(chain[1])
    assert relative_backing(b.layer_file(chain[1])) is None  # an absolute name: QEMU finds it by itself


def test_the_frozen_layer_is_always_written_and_the_layers_under_it_only_when_missing(tmp_path: Path, base: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    a = host(tmp_path, "host-a", store)
    shared = SharedPathCommitStore(a)
    shared.prepare()
    commit_id, chain = make_commit(a, base)
    a.store_layer_file(chain[0]).write_bytes(b"stale copy of a layer the VM still wrote to")
    a.store_layer_file(chain[1]).write_bytes(b"already published")
    shared.publish(commit_id, chain, "{}")
    assert a.store_layer_file(chain[0]).read_bytes() == a.layer_file(chain[0]).read_bytes()
    assert a.store_layer_file(chain[1]).read_bytes() == b"already published"


def test_concurrent_fetches_of_one_commit_on_one_host_all_succeed(tmp_path: Path, base: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    a, b = host(tmp_path, "host-a", store), host(tmp_path, "host-b", store)
    SharedPathCommitStore(a).prepare()
    commit_id, chain = make_commit(a, base)
    SharedPathCommitStore(a).publish(commit_id, chain, "{}")
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            SharedPathCommitStore(b).fetch(commit_id, chain)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert (b.commit_folder(commit_id) / "state").read_bytes() == (a.commit_folder(commit_id) / "state").read_bytes()
    assert all(b.layer_file(layer).read_bytes() == a.layer_file(layer).read_bytes() for layer in chain)
    assert not [p for p in b.data.rglob(f"*{PART}*")]


def test_what_is_neither_here_nor_in_the_store_is_refused_by_name(tmp_path: Path, base: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    a, b = host(tmp_path, "host-a", store), host(tmp_path, "host-b", store)
    SharedPathCommitStore(a).prepare()
    commit_id, chain = make_commit(a, base)
    SharedPathCommitStore(a).publish(commit_id, chain, "{}")
    a.store_layer_file(chain[1]).unlink()
    with pytest.raises(DataLoss, match=f"layer {chain[1]} is neither on this host"):
        SharedPathCommitStore(b).fetch(commit_id, chain)


def test_deletions_and_orphans_leave_the_store_and_this_host(tmp_path: Path, base: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    a = host(tmp_path, "host-a", store)
    shared = SharedPathCommitStore(a)
    shared.prepare()
    commit_id, chain = make_commit(a, base)
    shared.publish(commit_id, chain, "{}")

    listed = shared.stored()
    young = a.store_layers / f"other.qcow2{PART}young"
    old = a.store_commits / f"other{PART}old"
    young.write_bytes(b"a publish under way on another host")
    old.mkdir()
    os.utime(old, (time.time() - STALE_PART_SECONDS - 60,) * 2)
    (a.store_commits / "made-after-listing").mkdir()
    removed = shared.remove_orphans(listed, commits=set(), layers={chain[1]})
    assert sorted(removed) == sorted([str(a.store_commit_folder(commit_id)), str(a.store_layer_file(chain[0])), str(old)])
    assert young.exists() and (a.store_commits / "made-after-listing").exists() and a.store_layer_file(chain[1]).exists()
    assert a.commit_folder(commit_id).exists(), "the data folder is the engine's to clean"

    shared.delete_layer(chain[1])
    assert not a.store_layer_file(chain[1]).exists() and not a.layer_file(chain[1]).exists()
    shared.delete_commit(commit_id)
    assert not a.commit_folder(commit_id).exists()


def test_the_local_store_is_the_data_folder_and_copies_nothing(tmp_path: Path, base: Path) -> None:
    a = host(tmp_path, "host-a", None)
    local = open_commit_store(a)
    assert isinstance(local, LocalCommitStore) and not local.shared
    commit_id, chain = make_commit(a, base)
    local.prepare()
    local.publish(commit_id, chain, "{}")
    assert local.fetch(commit_id, chain) is False
    local.drop_cached(commit_id, chain[0])
    assert a.commit_folder(commit_id).exists() and a.layer_file(chain[0]).exists(), "its only copies are kept"
    assert sorted(os.listdir(tmp_path / "host-a")) == ["commits", "layers"]
    assert local.folder_bytes(commit_id) > 0 and local.layer_bytes(chain[0]) > 0
    local.delete_commit(commit_id)
    local.delete_layer(chain[0])
    assert not a.commit_folder(commit_id).exists() and not a.layer_file(chain[0]).exists()


def test_the_setting_and_the_layout(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).commit_store_path is None
    assert Layout.of(Settings(data_dir=tmp_path)).org_images == tmp_path.resolve() / "org-images"
    shared = Settings(data_dir=tmp_path, commit_store="/mnt/vers-store")
    assert Layout.of(shared).org_images == Path("/mnt/vers-store/org-images")
    assert Layout.of(shared).store_layer_file("x") == Path("/mnt/vers-store/layers/x.qcow2")
    with pytest.raises(ValidationError, match="absolute path"):
        Settings(data_dir=tmp_path, commit_store="relative/store")


def test_a_store_that_is_not_mounted_is_refused(tmp_path: Path) -> None:
    layout = host(tmp_path, "host-a", tmp_path / "not-mounted")
    with pytest.raises(RuntimeError, match="is not a folder: mount the shared folder"):
        SharedPathCommitStore(layout).prepare()


def test_qemu_is_told_the_file_under_a_layer_passed_as_a_descriptor(tmp_path: Path) -> None:
    spec = LaunchSpec(
        vm_id="vm", run_folder=tmp_path, accel="tcg", vcpus=1, mem_mib=128, kernel=tmp_path / "k", initramfs=tmp_path / "i",
        disk=tmp_path / "layers" / "top.qcow2", ram_mode="anonymous", ram_file=None, incoming=True,
    )  # fmt: skip
    drive = qemu_args(spec, disk_fds=(10, 11), backing=tmp_path / "layers" / "under,1.qcow2")
    option = drive[drive.index("-drive") + 1]
    assert option.startswith(f"file=/dev/fdset/{DISK_FDSET},file.locking=off,backing.driver=qcow2,backing.file.driver=file,")
    assert f"backing.file.filename={tmp_path}/layers/under,,1.qcow2," in option
    plain = qemu_args(spec, disk_fds=(10, 11))
    assert "backing." not in plain[plain.index("-drive") + 1]


# A platform whose commits go to a shared folder (VMs under TCG: one test, several steps)


@pytest_asyncio.fixture(scope="module")
async def shared_platform(tmp_path_factory: pytest.TempPathFactory, images: Path) -> AsyncIterator[Platform]:
    store = tmp_path_factory.mktemp("commit-store")
    settings = conftest.test_settings(tmp_path_factory.mktemp("vers-data-shared")).model_copy(update={"commit_store": str(store)})
    platform = await Platform.start(settings)
    assert isinstance(platform, Platform)
    yield platform
    kill_vms_under(platform.settings.vm_run_dir)
    await platform.stop()
    discard(platform.settings.data_dir)
    discard(store)


def forget_here(layout: Layout, commit_id: str, layer_ids: list[str]) -> None:
    """What another host would lack: this host's copies of the commit's folder and of its layers."""
    for path in (layout.commit_folder(commit_id) / name for name in os.listdir(layout.commit_folder(commit_id))):
        path.unlink()
    layout.commit_folder(commit_id).rmdir()
    for layer_id in layer_ids:
        layout.layer_file(layer_id).unlink()


async def test_commits_are_in_the_shared_store_and_branch_on_a_host_without_them(shared_platform: Platform) -> None:
    platform = shared_platform
    layout = Layout.of(platform.settings)
    assert layout.store is not None
    org: Org = await platform.new_org("store")
    async with platform.client(org) as http:
        vm = await new_vm(http, mem_size_mib=128)
        await out(http, vm, "echo kept > /root/marker && sync && " + COUNTER)
        before = await counter_above(http, vm, 5)
        answer = await http.post(f"/api/v1/vm/{vm}/commit", json={})
        assert answer.status_code == 201, answer.text
        first = answer.json()["commit_id"]
        # complete in the store when the call answers: its frozen layer, named relative to its folder, and its folder
        frozen = [p.stem for p in layout.store_layers.iterdir()]
        assert len(frozen) == 1 and os.path.isabs(qcow2_backing(layout.store_layer_file(frozen[0])) or "")  # an image's disk
        folder = layout.store_commit_folder(first)
        assert {"state", "ram", CHECKSUMS_FILE} <= set(os.listdir(folder))
        recorded = json.loads((folder / CHECKSUMS_FILE).read_text())
        assert all((folder / name).stat().st_size == entry["size"] for name, entry in recorded["files"].items())
        assert not [p for p in layout.store.rglob(f"*{PART}*")]
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200

        # another host: none of the commit's files here; the branch copies them from the store and goes on
        forget_here(layout, first, frozen)
        # `vers admin fsck` reads the store: the commit is whole there, nothing is missing or orphan
        checked = await fsck(platform, VERS_COMMIT_STORE=str(layout.store))
        found = {code for code, _ in checked.keys("problems")}
        assert not found & {"commit-damaged", "layer-missing", "orphan-commit-folder", "orphan-layer-file"}, checked.report
        answer = await http.post(f"/api/v1/vm/branch/by_commit/{first}")
        assert answer.status_code == 201, answer.text
        branch = answer.json()["vms"][0]["vm_id"]
        assert await out(http, branch, "cat /root/marker") == "kept\n"
        assert await counter(http, branch) >= before, "the counter restarted instead of continuing"
        assert layout.commit_folder(first).is_dir() and layout.layer_file(frozen[0]).exists()

        # a chain of two layers, each named relative to its folder, copied to a host that has neither
        answer = await http.post(f"/api/v1/vm/{branch}/commit", json={})
        assert answer.status_code == 201, answer.text
        second = answer.json()["commit_id"]
        layers = sorted(p.stem for p in layout.store_layers.iterdir())
        assert len(layers) == 2
        upper = next(layer for layer in layers if layer != frozen[0])
        assert qcow2_backing(layout.store_layer_file(upper)) == f"{frozen[0]}.qcow2"
        assert (await http.delete(f"/api/v1/vm/{branch}")).status_code == 200
        forget_here(layout, second, layers)
        answer = await http.post("/api/v1/vm/from_commit", json={"commit_id": second})
        assert answer.status_code == 201, answer.text
        restored = answer.json()["vm_id"]
        assert await out(http, restored, "cat /root/marker") == "kept\n"
        assert await counter(http, restored) >= before
        assert (await http.delete(f"/api/v1/vm/{restored}")).status_code == 200

        # a damaged file in the store is refused, by name, and nothing is left half-copied here
        state = layout.store_commit_folder(second) / "state"
        state.chmod(0o600)
        with state.open("r+b") as file:
            file.seek(100)
            file.write(b"\xff" * 16)
        forget_here(layout, second, [])
        stray = layout.store_commit_folder("00000000-0000-4000-8000-000000000000")
        stray.mkdir()
        backdate(stray)
        checked = await fsck(platform, VERS_COMMIT_STORE=str(layout.store))
        assert {("commit-damaged", f"commit {second}"), ("orphan-commit-folder", str(stray))} <= checked.keys(), checked.report
        stray.rmdir()
        refused = await http.post("/api/v1/vm/from_commit", json={"commit_id": second})
        assert refused.status_code >= 400
        assert "does not match its checksum" in refused.text and "commit store" in refused.text, refused.text
        assert not layout.commit_folder(second).exists()

        # deleted: gone from the store and from this host; its layer too, once nothing stands on it
        assert (await http.delete(f"/api/v1/commits/{second}")).status_code == 204
        assert not layout.store_commit_folder(second).exists() and not layout.commit_folder(second).exists()
        assert not layout.store_layer_file(upper).exists() and not layout.layer_file(upper).exists()
        assert (await http.delete(f"/api/v1/commits/{first}")).status_code == 204
        assert not list(layout.store_commits.iterdir()) and not list(layout.store_layers.iterdir())
