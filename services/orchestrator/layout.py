"""Where the platform keeps its files: one place names every folder and file path of the data folder, the
image cache and the run folder, for the engine, `vers admin fsck` and the benchmarks alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.settings import Settings


@dataclass(frozen=True)
class Layout:
    """The paths of one platform's files. `data` is VERS_DATA_DIR (databases, keys, disks, commits), `images`
    the image cache (VERS_IMAGES_DIR, else `images/` in the data folder), `run` the folder in tmpfs where each
    running VM has its sockets, logs and RAM file (VERS_RUN_DIR, else /dev/shm/vers-<hash of the data folder>),
    `store` the shared commit store's folder (VERS_COMMIT_STORE; None when it is "local", the data folder).

    With a shared store, the data folder's `layers/` and `commits/` are this host's: its VMs' writable layers,
    the commits it made and those it copied from the store (its cache). The store holds the same names under
    its own `layers/` and `commits/`, and the organizations' images, which every host reads."""

    data: Path
    images: Path
    run: Path
    store: Path | None = None

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        return cls(data=settings.data_dir.resolve(), images=settings.image_root, run=settings.vm_run_dir, store=settings.commit_store_path)

    @property
    def layers(self) -> Path:
        """Every disk layer of this host, a qcow2 file named by its id: VMs write to theirs, commits freeze theirs.
        A layer names the one under it by its file name alone (layers made before by its absolute path)."""
        return self.data / "layers"

    @property
    def commits(self) -> Path:
        """A folder per commit: its device state, its memory, and nothing else (its disk is a layer)."""
        return self.data / "commits"

    @property
    def sleeping(self) -> Path:
        """A folder per sleeping VM: its saved devices and memory, until it wakes (on this host: never in the
        commit store, whatever VERS_COMMIT_STORE says)."""
        return self.data / "sleeping"

    @property
    def exec_logs(self) -> Path:
        """A folder per VM: the output of the commands run in it (it outlives restarts, not the VM; on this host,
        never in the commit store)."""
        return self.data / "exec-logs"

    @property
    def org_images(self) -> Path:
        """A folder per image an organization made through the images API (its root disk and manifest); in the
        shared store when there is one, since a VM of it may run on any host (at the same path on every host)."""
        return (self.store or self.data) / "org-images"

    @property
    def store_layers(self) -> Path:
        """The shared store's frozen layers, named as in `layers` (a shared store only)."""
        assert self.store is not None
        return self.store / "layers"

    @property
    def store_commits(self) -> Path:
        """The shared store's commit folders, named as in `commits` (a shared store only)."""
        assert self.store is not None
        return self.store / "commits"

    @property
    def private_folders(self) -> tuple[Path, ...]:
        """The folders the orchestrator makes on start, each this process's alone."""
        return (self.layers, self.commits, self.sleeping, self.exec_logs, self.run)

    def layer_file(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.qcow2"

    def commit_folder(self, commit_id: str) -> Path:
        return self.commits / commit_id

    def store_layer_file(self, layer_id: str) -> Path:
        return self.store_layers / f"{layer_id}.qcow2"

    def store_commit_folder(self, commit_id: str) -> Path:
        return self.store_commits / commit_id

    def sleep_folder(self, vm_id: str) -> Path:
        return self.sleeping / vm_id

    def exec_log_folder(self, vm_id: str) -> Path:
        return self.exec_logs / vm_id

    def run_folder(self, vm_id: str) -> Path:
        """A running VM's sockets (QMP, agent, console), pid file, QEMU and serial logs, and RAM file."""
        return self.run / vm_id
