"""What a new VM is asked to be (VmConfig), and the checks of such a request against what this platform
offers, made before anything is recorded or started."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.names import validate_vm_labels
from services.orchestrator.images import DEFAULT_IMAGE, KERNEL_NAME, Image, find_image, list_images
from services.orchestrator.network import NETWORK_MODES, GuestNetwork
from vers.orchestrator.v1 import orchestrator_pb2 as pb

MAX_VCPUS = 16
MEMORY_RANGE_MIB = (128, 65536)
MAX_DISK_MIB = 1024 * 1024
MAX_BRANCH_COUNT = 16
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256
# A new VM's disk when none is asked for: its image's, and at least this.
DEFAULT_DISK_MIB = 1024


@dataclass(frozen=True)
class VmConfig:
    """A request for a new root VM; 0 and "" leave a field to its default."""

    vcpu_count: int = 0
    mem_size_mib: int = 0
    fs_size_mib: int = 0
    image_name: str = ""
    kernel_name: str = ""
    labels: Mapping[str, str] | None = None
    network: str = ""

    @classmethod
    def of(cls, message: pb.VmConfig, labels: Mapping[str, str] | None = None) -> VmConfig:
        """The config a request carries; `labels` in place of the message's when given."""
        return cls(
            message.vcpu_count, message.mem_size_mib, message.fs_size_mib, message.image_name, message.kernel_name,
            dict(message.labels) if labels is None else labels, message.network,
        )  # fmt: skip

    def checked(self, image: Image, network: GuestNetwork) -> VmConfig:
        """This config with every default filled in, for `image` on this host's `network`; InvalidArgument
        naming the field to fix when one is out of range."""
        if self.kernel_name not in ("", KERNEL_NAME):
            raise InvalidArgument(f"kernel_name must be {KERNEL_NAME!r} (or left out)")
        vcpus = self.vcpu_count or DEFAULT_VCPUS
        memory = self.mem_size_mib or DEFAULT_MEMORY_MIB
        disk = self.fs_size_mib or max(image.disk_mib, DEFAULT_DISK_MIB)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise InvalidArgument(f"vcpu_count must be between 1 and {MAX_VCPUS}, not {vcpus}")
        if not MEMORY_RANGE_MIB[0] <= memory <= MEMORY_RANGE_MIB[1]:
            raise InvalidArgument(f"mem_size_mib must be between {MEMORY_RANGE_MIB[0]} and {MEMORY_RANGE_MIB[1]}, not {memory}")
        if not image.disk_mib <= disk <= MAX_DISK_MIB:
            raise InvalidArgument(
                f"fs_size_mib must be between {image.disk_mib} (the size of image {image.name!r}) and {MAX_DISK_MIB}, not {disk}"
            )
        validate_vm_labels(dict(self.labels or {}))
        # Without the privileges for outbound networking, VMs get a closed NIC unless "nat" is asked for.
        mode = self.network or ("nat" if network.available else "none")
        check_network(mode, network)
        return replace(self, vcpu_count=vcpus, mem_size_mib=memory, fs_size_mib=disk, image_name=image.name, network=mode)


def image_named(root: Path, name: str) -> Image:
    """The image of that name ("" for the default), or InvalidArgument listing the images there are."""
    image = find_image(root, name or DEFAULT_IMAGE)
    if image is None:
        known = ", ".join(list_images(root)) or "none: run `make images`"
        raise InvalidArgument(f"image {name!r} does not exist; images: {known}")
    return image


def check_network(mode: str, network: GuestNetwork) -> None:
    """`mode` is a network mode this host can give a VM."""
    if mode not in NETWORK_MODES:
        raise InvalidArgument(f'network must be "nat" (outbound access, the default) or "none", not {mode!r}')
    if mode == "nat" and not network.available:
        raise FailedPrecondition(
            f'this host cannot give VMs outbound network ({network.reason}): ask for network "none", or see the README'
        )


def check_branch_count(count: int) -> None:
    if not 1 <= count <= MAX_BRANCH_COUNT:
        raise InvalidArgument(f"count must be between 1 and {MAX_BRANCH_COUNT}, not {count}")
