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
    running VM has its sockets, logs and RAM file (VERS_RUN_DIR, else /dev/shm/vers-<hash of the data folder>)."""

    data: Path
    images: Path
    run: Path

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        return cls(data=settings.data_dir.resolve(), images=settings.image_root, run=settings.vm_run_dir)

    @property
    def layers(self) -> Path:
        """Every disk layer, a qcow2 file named by its id: VMs write to theirs, commits freeze theirs."""
        return self.data / "layers"

    @property
    def commits(self) -> Path:
        """A folder per commit: its device state, its memory, and nothing else (its disk is a layer)."""
        return self.data / "commits"

    @property
    def sleeping(self) -> Path:
        """A folder per sleeping VM: its saved devices and memory, until it wakes."""
        return self.data / "sleeping"

    @property
    def exec_logs(self) -> Path:
        """A folder per VM: the output of the commands run in it (it outlives restarts, not the VM)."""
        return self.data / "exec-logs"

    @property
    def org_images(self) -> Path:
        """A folder per image an organization made through the images API (its root disk and manifest)."""
        return self.data / "org-images"

    @property
    def private_folders(self) -> tuple[Path, ...]:
        """The folders the orchestrator makes on start, each this process's alone."""
        return (self.layers, self.commits, self.sleeping, self.exec_logs, self.run)

    def layer_file(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.qcow2"

    def commit_folder(self, commit_id: str) -> Path:
        return self.commits / commit_id

    def sleep_folder(self, vm_id: str) -> Path:
        return self.sleeping / vm_id

    def exec_log_folder(self, vm_id: str) -> Path:
        return self.exec_logs / vm_id

    def run_folder(self, vm_id: str) -> Path:
        """A running VM's sockets (QMP, agent, console), pid file, QEMU and serial logs, and RAM file."""
        return self.run / vm_id
