"""QEMU's command line as the orchestrator builds it (services/orchestrator/machine.py qemu_args): what the
resulting argument list holds, whatever the code that builds it looks like."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.orchestrator.machine import DISK_FDSET, LaunchSpec, qemu_args

RUN = Path("/dev/shm/vers-test/vm-1")


def spec(**changes: object) -> LaunchSpec:
    values: dict[str, object] = {
        "vm_id": "vm-1",
        "run_folder": RUN,
        "accel": "kvm",
        "vcpus": 2,
        "mem_mib": 512,
        "kernel": Path("/images/kernel-1/vmlinux"),
        "initramfs": Path("/images/kernel-1/initramfs.cpio"),
        "disk": Path("/data/layers/l1.qcow2"),
        "ram_mode": "shared",
        "ram_file": RUN / "ram",
        "incoming": False,
        "network": "nat",
    }
    return LaunchSpec(**{**values, **changes})  # type: ignore[arg-type]


def qemu(args: list[str]) -> list[str]:
    """The arguments from the QEMU binary on: what runs before it (a network namespace, setpriv) depends on
    the host's capabilities."""
    return args[args.index("qemu-system-x86_64") :]


def option(args: list[str], name: str) -> list[str]:
    """Every value given to `name`, in order."""
    return [args[i + 1] for i, arg in enumerate(args) if arg == name]


def test_the_machine_is_sized_and_booted_from_the_images_kernel() -> None:
    args = qemu(qemu_args(spec()))
    assert option(args, "-name") == ["vers-vm-1"]
    assert option(args, "-smp") == ["2"] and option(args, "-m") == ["512M"]
    assert option(args, "-kernel") == ["/images/kernel-1/vmlinux"]
    assert option(args, "-initrd") == ["/images/kernel-1/initramfs.cpio"]
    assert option(args, "-append") == ["console=ttyS0 quiet panic=-1 init_on_free=1"]
    assert option(args, "-machine") == ["pc,memory-backend=ram0"]
    for isolated in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert isolated in args
    assert option(args, "-display") == ["none"]


def test_the_guest_does_not_run_before_qemu_is_ready() -> None:
    new = qemu(qemu_args(spec()))
    assert "-S" in new and "-incoming" not in new
    restored = qemu(qemu_args(spec(incoming=True)))
    assert option(restored, "-incoming") == ["defer"] and "-S" not in restored


@pytest.mark.parametrize(
    ("accel", "expected"), [("kvm", ["-accel", "kvm", "-cpu", "host"]), ("tcg", ["-accel", "tcg,thread=multi,tb-size=64", "-cpu", "max"])]
)
def test_the_accelerator_and_cpu_model(accel: str, expected: list[str]) -> None:
    args = qemu(qemu_args(spec(accel=accel)))
    assert option(args, "-accel") == [expected[1]] and option(args, "-cpu") == [expected[3]]


def test_the_translated_code_cache_is_capped_by_the_setting() -> None:
    assert option(qemu(qemu_args(spec(accel="tcg", tcg_code_cache_mib=16))), "-accel") == ["tcg,thread=multi,tb-size=16"]
    assert option(qemu(qemu_args(spec(accel="kvm", tcg_code_cache_mib=16))), "-accel") == ["kvm"]


def test_memory_backends_by_ram_mode() -> None:
    shared = option(qemu(qemu_args(spec(ram_mode="shared"))), "-object")
    assert shared == [f"memory-backend-file,id=ram0,size=512M,mem-path={RUN}/ram,share=on"]
    private = option(qemu(qemu_args(spec(ram_mode="private", ram_file=Path("/data/commits/c1/ram")))), "-object")
    assert private == ["memory-backend-file,id=ram0,size=512M,mem-path=/data/commits/c1/ram,share=off"]
    anonymous = option(qemu(qemu_args(spec(ram_mode="anonymous", ram_file=None))), "-object")
    assert anonymous == ["memory-backend-ram,id=ram0,size=512M"]


def test_commas_in_paths_are_escaped_in_options() -> None:
    args = qemu(qemu_args(spec(ram_file=Path("/data/a,b/ram"), disk=Path("/data/x,y.qcow2"))))
    assert option(args, "-object") == ["memory-backend-file,id=ram0,size=512M,mem-path=/data/a,,b/ram,share=on"]
    assert option(args, "-drive") == ["file=/data/x,,y.qcow2,if=virtio,format=qcow2,discard=unmap"]


def test_a_disk_by_path_or_as_descriptors() -> None:
    by_path = qemu(qemu_args(spec()))
    assert option(by_path, "-drive") == ["file=/data/layers/l1.qcow2,if=virtio,format=qcow2,discard=unmap"]
    assert "-add-fd" not in by_path
    by_fds = qemu(qemu_args(spec(), disk_fds=(41, 42)))
    assert option(by_fds, "-add-fd") == [
        f"fd=41,set={DISK_FDSET},opaque=rw:/data/layers/l1.qcow2",
        f"fd=42,set={DISK_FDSET},opaque=ro:/data/layers/l1.qcow2",
    ]
    # the layer is never opened by its path, and without image locks (the fdset outlives a reopen)
    assert option(by_fds, "-drive") == [f"file=/dev/fdset/{DISK_FDSET},file.locking=off,if=virtio,format=qcow2,discard=unmap"]
    assert by_fds.index("-add-fd") < by_fds.index("-drive")


def test_sockets_console_and_serial_log_live_in_the_run_folder() -> None:
    args = qemu(qemu_args(spec()))
    assert option(args, "-qmp") == [f"unix:{RUN}/qmp.sock,server=on,wait=off"]
    assert option(args, "-chardev") == [
        f"socket,id=agent,path={RUN}/agent.sock,server=on,wait=off",
        f"socket,id=console,path={RUN}/console.sock,server=on,wait=off",
        f"file,id=serial0,path={RUN}/serial.log,append=on",
    ]
    assert option(args, "-serial") == ["chardev:serial0"]
    assert option(args, "-pidfile") == [f"{RUN}/qemu.pid"]
    devices = option(args, "-device")
    for device in ("virtio-serial-pci", "virtserialport,chardev=agent,name=agent", "virtconsole,chardev=console", "virtio-rng-pci"):
        assert device in devices


def test_privileges_are_dropped_to_the_qemu_user() -> None:
    as_user = qemu_args(spec(), user="vers-qemu")
    assert option(as_user, "-runas") == ["vers-qemu"]
    assert option(as_user, "-sandbox") == ["on,obsolete=deny,resourcecontrol=deny,spawn=deny"]
    own = qemu_args(spec())
    assert "-runas" not in own
    assert option(own, "-sandbox") == ["on,obsolete=deny,resourcecontrol=deny,spawn=deny,elevateprivileges=deny"]
    # setpriv (no inheritable or ambient capabilities) runs QEMU, under the spec's prefix
    prefixed = qemu_args(spec(prefix=("ip", "netns", "exec", "vers-ns")))
    assert prefixed[:4] == ["ip", "netns", "exec", "vers-ns"]
    setpriv = prefixed[4 : prefixed.index("qemu-system-x86_64")]
    assert setpriv[0] == "setpriv" and setpriv[-1] == "--"
    assert "--inh-caps=-all" in setpriv and "--ambient-caps=-all" in setpriv


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("nat", ["-netdev", "user,id=net0,net=10.0.2.0/24,ipv6=off,restrict=off"]),
        ("none", ["-netdev", "user,id=net0,net=10.0.2.0/24,ipv6=off,restrict=on"]),
        ("", ["-nic", "none"]),
    ],
)
def test_the_nic_by_network_mode(network: str, expected: list[str]) -> None:
    args = qemu(qemu_args(spec(network=network)))
    assert option(args, expected[0]) == [expected[1]]
    nic = [device for device in option(args, "-device") if device.startswith("virtio-net-pci")]
    assert nic == ([] if not network else ["virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile="])
