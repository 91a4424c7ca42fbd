"""Guest networking: every VM's NIC is QEMU's user-mode stack (libslirp), and every QEMU with a NIC runs in
one network namespace of this platform, whose only way out is a veth pair to the host, NAT'd there, with
nftables on both ends.

Why this shape:
- A user-mode stack per VM gives every VM the same private segment (10.0.2.15, gateway 10.0.2.2, DNS
  10.0.2.3). A branch or a restored commit therefore has working networking the moment it runs: the
  address its memory holds is right in every copy, no lease to renew, no address to hand out, and no
  extra process per VM (passt would be one more process per VM to start, watch and adopt).
- The namespace makes the host's loopback unreachable by construction (its `lo` is not the host's), and
  its nftables rules refuse private, link-local and loopback ranges, other VMs and this platform, unless
  the operator allows an address or range (VERS_GUEST_ALLOW; the host's own addresses stay closed). The
  guest's DNS queries go to the resolvers the namespace's resolv.conf names (the host's, or VERS_GUEST_DNS), port 53 only.
- A guest port is reached (tunnels, SSH, domains) by a slirp host forward bound to the namespace's veth
  address, opened on demand; only the orchestrator's user may connect to it from the host, and nothing in
  the namespace (no guest) may.

Setting this up needs root. Without it, VMs with network "none" still work (their stack is restricted: no
packet leaves it; host forwards, then on loopback, still reach it) and "nat" is refused with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import shutil
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

log = logging.getLogger(__name__)

GUEST_ADDRESS = "10.0.2.15"
GUEST_NET = "10.0.2.0/24"
NETWORK_MODES = ("nat", "none")
# Ranges a guest never reaches unless allowed: this-network, private, shared (CGNAT, where the platform's
# own veth pairs live), loopback, link-local (cloud metadata), documentation, benchmarking, multicast,
# reserved, and the cloud metadata endpoints outside those.
BLOCKED_RANGES = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "168.63.129.16/32",  # Azure's WireServer, its metadata and agent endpoint
)  # fmt: skip
# Each platform's veth pair is a /30 of this range.
LINK_RANGE = ipaddress.ip_network("100.64.0.0/10")
# Host forwards (one per guest port in use) listen on the namespace's address, on ports of this range.
FORWARD_PORTS = (20000, 29999)
LOCK_FILE = Path("/run/vers-network.lock")


CAP_SETPCAP, CAP_NET_ADMIN, CAP_SYS_ADMIN = 8, 12, 21


def has_capabilities(*capabilities: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
                return all(effective >> capability & 1 for capability in capabilities)
    return False


class NetworkUnavailable(Exception):
    """This host cannot give VMs outbound networking (the reason is the message)."""


def _run(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetworkUnavailable(f"`{' '.join(args[:4])} …` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _nameservers(resolv_conf: Path) -> list[str]:
    servers = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(parts[1]).version == 4:
                        servers.append(parts[1])
    return servers


def host_resolvers() -> list[str]:
    """The host's DNS resolvers as a namespace can reach them: a local stub's (systemd-resolved) upstreams."""
    servers = _nameservers(Path("/etc/resolv.conf"))
    if servers and all(ipaddress.ip_address(s).is_loopback for s in servers):
        servers = _nameservers(Path("/run/systemd/resolve/resolv.conf"))
    return [s for s in servers if not ipaddress.ip_address(s).is_loopback]


def guest_resolvers(setting: str) -> list[str]:
    """VERS_GUEST_DNS: the resolvers named, "none" for none (guests' names do not resolve), the host's when empty."""
    if setting.strip() == "none":
        return []
    return [str(ipaddress.ip_network(r).network_address) for r in parse_ranges(setting, "VERS_GUEST_DNS")] if setting else host_resolvers()


def parse_ranges(text: str, setting: str) -> list[str]:
    ranges = []
    for item in text.replace(",", " ").split():
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{setting}: {item!r} is not an IPv4 address or range (e.g. 10.1.2.3 or 10.1.0.0/16)") from None
        if network.version != 4:
            raise ValueError(f"{setting}: {item!r} is not IPv4; guests have IPv4 only")
        ranges.append(str(network))
    return ranges


class GuestNetwork:
    """The namespace, veth pair and nftables tables of one platform (keyed by its run folder)."""

    def __init__(self, run_dir: Path, allow: list[str], dns: list[str]) -> None:
        key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
        self.netns = f"vers-{key}"
        self.host_if = f"vh-{key}"
        self.ns_if = f"vn-{key}"
        self.table = f"vers_{key}"
        self.allow = allow
        self.dns = dns
        self.host_address = ""
        self.ns_address = ""
        self.available = False
        self.reason = ""
        self._next_port = FORWARD_PORTS[0] + int(key, 16) % (FORWARD_PORTS[1] - FORWARD_PORTS[0])

    # Setting up and tearing down

    def setup(self) -> None:
        """Create (or find again, after a restart with VMs still running) the namespace, link and rules."""
        try:
            if shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
                raise NetworkUnavailable("nft (Debian package nftables) is not installed")
            if not has_capabilities(CAP_NET_ADMIN, CAP_SYS_ADMIN):
                raise NetworkUnavailable("guest networking needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN, to make its namespace and rules")
            LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # platforms on one host choose their link addresses in turn
                self._link()
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            folder = Path("/etc/netns") / self.netns
            folder.mkdir(parents=True, exist_ok=True)
            # Read by QEMU's user-mode stack (as QEMU's own user) wherever `ip netns exec` mounts it: world-readable.
            resolv = folder / "resolv.conf"
            resolv.write_text("".join(f"nameserver {server}\n" for server in self.dns))
            resolv.chmod(0o644)
            _run("nft", "-f", "-", stdin=self._host_rules())
            _run("ip", "netns", "exec", self.netns, "nft", "-f", "-", stdin=self._namespace_rules())
        except (NetworkUnavailable, OSError) as error:
            self.reason = str(error)
            log.warning('VMs get no outbound network (network "nat" is refused): %s', error)
            return
        self.available = True
        dns, allowed = ", ".join(self.dns) or "none", ", ".join(self.allow) or "none"
        log.info("guest network: namespace %s, link %s <-> %s, resolvers %s, allowed %s",
                 self.netns, self.host_address, self.ns_address, dns, allowed)  # fmt: skip

    def _link(self) -> None:
        if not Path(f"/run/netns/{self.netns}").exists():
            _run("ip", "netns", "add", self.netns)
        found = _run("ip", "-o", "-4", "addr", "show", "dev", self.host_if).split() if self._has_host_link() else []
        if "inet" in found:
            linked = ipaddress.IPv4Interface(found[found.index("inet") + 1])
            self.host_address, self.ns_address = str(linked.ip), str(linked.ip + 1)
            return
        if self._has_host_link():
            _run("ip", "link", "del", self.host_if)
        subnet = self._free_subnet()
        host, ns = list(subnet.hosts())
        self.host_address, self.ns_address = str(host), str(ns)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.netns)
        _run("ip", "addr", "add", f"{host}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        inside = ("ip", "netns", "exec", self.netns, "ip")
        _run(*inside, "addr", "add", f"{ns}/30", "dev", self.ns_if)
        _run(*inside, "link", "set", self.ns_if, "up")
        _run(*inside, "link", "set", "lo", "up")
        _run(*inside, "route", "add", "default", "via", str(host))

    def _has_host_link(self) -> bool:
        return Path(f"/sys/class/net/{self.host_if}").exists()

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = set()
        for line in _run("ip", "-o", "-4", "addr", "show").splitlines():
            parts = line.split()
            if "inet" in parts:
                address = ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip
                used.add(ipaddress.ip_network(f"{address}/30", strict=False))
        count = LINK_RANGE.num_addresses // 4
        start = int(self.table.removeprefix("vers_"), 16) % count
        for index in range(start, start + count):
            subnet = ipaddress.IPv4Network((int(LINK_RANGE.network_address) + (index % count) * 4, 30))
            if subnet not in used:
                return subnet
        raise NetworkUnavailable(f"no free /30 left in {LINK_RANGE}")

    def _host_rules(self) -> str:
        me = os.geteuid()
        return f"""
table inet {self.table} {{}}
delete table inet {self.table}
table inet {self.table} {{
  {self._sets()}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{self.host_if}" ct state established,related accept
    iifname "{self.host_if}" ip daddr @resolvers meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname "{self.host_if}" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    oifname "{self.host_if}" ct state established,related accept
    oifname "{self.host_if}" drop
    iifname "{self.host_if}" ct status dnat drop
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname "{self.host_if}" ct state new meta skuid != {me} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {self.ns_address} oifname != "{self.host_if}" masquerade
  }}
}}
"""

    def _sets(self) -> str:
        def elements(items: list[str] | tuple[str, ...]) -> str:
            return f"elements = {{ {', '.join(items)} }}" if items else ""

        return (
            f"set allowed {{ type ipv4_addr; flags interval; {elements(self.allow)} }}\n"
            f"  set resolvers {{ type ipv4_addr; flags interval; {elements(self.dns)} }}\n"
            f"  set blocked {{ type ipv4_addr; flags interval; {elements(BLOCKED_RANGES)} }}"
        )

    def _namespace_rules(self) -> str:
        return f"""
table inet vers {{}}
delete table inet vers
table inet vers {{
  {self._sets()}
  chain output {{
    type filter hook output priority filter; policy accept;
    ct state established,related accept
    meta nfproto ipv6 drop
    ip daddr @allowed accept
    ip daddr @resolvers meta l4proto {{ tcp, udp }} th dport 53 accept
    ip daddr @blocked reject
    tcp dport 25 reject
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname "{self.ns_if}" ip saddr {self.host_address} tcp dport {FORWARD_PORTS[0]}-{FORWARD_PORTS[1]} accept
  }}
}}
"""

    def teardown(self) -> None:
        """Remove the namespace, link, rules and resolv.conf (when no QEMU runs in the namespace any more)."""
        remove(self.netns, self.host_if, self.table)
        self.available = False

    # Using it

    def launch_prefix(self, network: str) -> list[str]:
        """What a QEMU with this network mode is started under: in the namespace whenever there is one (a
        "none" VM's forwards then listen where only the orchestrator reaches them). The machine adds how
        QEMU gives up privileges (machine.privilege_drop)."""
        if network == "nat" and not self.available:
            raise NetworkUnavailable(self.reason or "guest networking is not set up")
        if network and self.available:
            return ["ip", "netns", "exec", self.netns]
        return []

    def forward_address(self) -> str:
        """Where host forwards listen: the namespace's address (only the orchestrator's user may connect
        from the host, nothing in the namespace may), else loopback for "none" VMs on hosts without it."""
        return self.ns_address if self.available else "127.0.0.1"

    def next_port(self) -> int:
        port = self._next_port
        self._next_port = FORWARD_PORTS[0] + (port + 1 - FORWARD_PORTS[0]) % (FORWARD_PORTS[1] - FORWARD_PORTS[0] + 1)
        return port


def remove(netns: str, host_if: str, table: str) -> None:
    for args in (("ip", "netns", "del", netns), ("ip", "link", "del", host_if), ("nft", "delete", "table", "inet", table)):
        subprocess.run(args, capture_output=True)
    shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)


def new_ssh_key(comment: str) -> tuple[str, str]:
    """An Ed25519 key pair: the private key in OpenSSH format, the public key as authorized_keys takes it."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private.decode(), f"{public.decode()} {comment}"


def netdev_args(network: str, mac: str = "52:54:00:12:34:56") -> list[str]:
    """QEMU's NIC: virtio, user-mode stack; "none" restricts it (no packet leaves, host forwards still
    come in); "" is a VM made before VMs had a NIC, whose saved devices have none."""
    if not network:
        return ["-nic", "none"]
    restrict = "on" if network == "none" else "off"
    return [
        "-netdev", f"user,id=net0,net={GUEST_NET},ipv6=off,restrict={restrict}",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
    ]  # fmt: skip
