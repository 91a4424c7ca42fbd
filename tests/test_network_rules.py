"""The guest network's settings and rules as text (no VMs, no namespaces): what is refused and allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.orchestrator.network import BLOCKED_RANGES, GuestNetwork, guest_resolvers, netdev_args, parse_ranges


def test_allowed_ranges_are_ipv4_addresses_or_networks() -> None:
    assert parse_ranges("10.1.2.3, 192.168.7.0/24 172.16.0.9/12", "VERS_GUEST_ALLOW") == [
        "10.1.2.3/32", "192.168.7.0/24", "172.16.0.0/12",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("VERS_GUEST_ALLOW: 'example.com' is not an IPv4 address or range")):
        parse_ranges("example.com", "VERS_GUEST_ALLOW")
    with pytest.raises(ValueError, match="not IPv4"):
        parse_ranges("fd00::1", "VERS_GUEST_ALLOW")


def test_guest_resolvers_none_named_or_the_hosts() -> None:
    assert guest_resolvers("none") == []
    assert guest_resolvers("10.0.0.53,9.9.9.9") == ["10.0.0.53", "9.9.9.9"]
    assert all(not address.startswith("127.") for address in guest_resolvers(""))


def test_the_namespace_refuses_private_loopback_and_link_local_unless_allowed(tmp_path: Path) -> None:
    network = GuestNetwork(tmp_path, allow=["198.18.5.2/32"], dns=["10.0.0.53"])
    network.host_address, network.ns_address = "100.64.0.1", "100.64.0.2"
    rules = network._namespace_rules()
    for blocked in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"):
        assert blocked in BLOCKED_RANGES and blocked in rules
    # allowed addresses and the resolvers (port 53 only) come before the refusal; IPv6 never leaves
    assert rules.index("@allowed accept") < rules.index("@blocked reject")
    assert "th dport 53 accept" in rules and "elements = { 10.0.0.53 }" in rules
    assert "meta nfproto ipv6 drop" in rules
    # nothing in the namespace (no guest) connects in; only the host's end of the link reaches the forwards
    assert "policy drop" in rules and "ip saddr 100.64.0.1 tcp dport 20000-29999 accept" in rules
    host = network._host_rules()
    assert f'iifname "{network.host_if}" drop' in host  # the namespace reaches no host address
    assert "masquerade" in host and "meta skuid !=" in host


def test_names_are_per_platform_and_fit_interface_names(tmp_path: Path) -> None:
    one, other = GuestNetwork(tmp_path / "a", [], []), GuestNetwork(tmp_path / "b", [], [])
    assert one.netns != other.netns and one.host_if != other.host_if
    assert max(len(one.host_if), len(one.ns_if)) <= 15


def test_the_nic_by_network_mode() -> None:
    assert netdev_args("") == ["-nic", "none"]  # a VM made before VMs had a NIC keeps its devices
    assert "restrict=off" in netdev_args("nat")[1] and "restrict=on" in netdev_args("none")[1]
    assert netdev_args("nat")[2:] == netdev_args("none")[2:]  # one device model: a branch may change mode


def test_what_a_domain_request_tells_the_guest_is_the_gateways_word() -> None:
    from services.gateway.domains import _guest_headers, _target

    scope = {
        "type": "http", "scheme": "http", "client": ("203.0.113.9", 5555), "raw_path": b"http://evil.example/admin",
        "path": "/admin", "query_string": b"a=1",
        "headers": [
            (b"host", b"app.vers.localhost"), (b"host", b"evil.example"), (b"x-forwarded-proto", b"https"),
            (b"forwarded", b"for=1.2.3.4;proto=https"), (b"x-real-ip", b"1.2.3.4"), (b"x-forwarded-host", b"evil.example"),
            (b"authorization", b"Bearer vers_secret"), (b"x-forwarded-for", b"10.0.0.1"), (b"accept", b"*/*"),
        ],
    }  # fmt: skip
    headers = _guest_headers(scope, frozenset())
    assert [value for name, value in headers if name == b"host"] == [b"app.vers.localhost"]
    assert (b"x-forwarded-proto", b"http") in headers and (b"x-forwarded-host", b"app.vers.localhost") in headers
    assert not {b"forwarded", b"x-real-ip", b"authorization"} & {name for name, _ in headers}
    assert (b"x-forwarded-for", b"10.0.0.1, 203.0.113.9") in headers and (b"accept", b"*/*") in headers
    assert _target(scope) == b"/admin?a=1"  # origin form: the guest never hears of another host


def test_domain_names_that_could_pass_for_others_are_refused() -> None:
    from services.common.errors import InvalidArgument
    from services.orchestrator.domains import Domains

    domains = Domains(store=None, suffix="vers.localhost", max_per_org=20)  # type: ignore[arg-type]
    assert domains.full_name("My-App.vers.localhost.") == "my-app.vers.localhost"
    for name in ("api", "www.vers.localhost", "xn--pple-43d", "a.b"):
        with pytest.raises(InvalidArgument):
            domains.full_name(name)
