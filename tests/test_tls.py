"""The platform with TLS on the gateway (HTTPS) and between its services (gRPC), from a throwaway CA. No VMs."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.platform import own_gateway_tls
from tests.conftest import Platform, kill_vms_under
from tests.conftest import test_settings as settings_in
from vers.registry.v1 import registry_pb2, registry_pb2_grpc


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(folder: Path) -> dict[str, Path]:
    """A CA, and a certificate it signs for 127.0.0.1 and localhost; PEM files in `folder`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("vers test CA"))
        .issuer_name(_name("vers test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_platform(tmp_path_factory) -> AsyncIterator[tuple[Platform, Path]]:  # type: ignore[no-untyped-def]
    files = make_ca_and_server_cert(tmp_path_factory.mktemp("tls"))
    settings = settings_in(tmp_path_factory.mktemp("vers-tls")).model_copy(
        update={
            "http_tls_cert_file": str(files["cert"]),
            "http_tls_key_file": str(files["key"]),
            "grpc_tls_cert_file": str(files["cert"]),
            "grpc_tls_key_file": str(files["key"]),
            "grpc_tls_ca_file": str(files["ca"]),
        }
    )
    platform = await Platform.start(settings)
    yield platform, files["ca"]
    kill_vms_under(platform.settings.vm_run_dir)
    await platform.stop()


def https_client(platform: Platform, ca: Path, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=platform.url,
        headers={"Authorization": f"Bearer {key}"},
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=60,
    )


async def test_repositories_over_https(tls_platform: tuple[Platform, Path]) -> None:
    platform, ca = tls_platform
    assert platform.url.startswith("https://")
    async with https_client(platform, ca, platform.admin_key) as admin:
        created = await admin.post("/api/v1/admin/orgs", json={"name": "tls-org"})
    assert created.status_code == 201, created.text
    async with https_client(platform, ca, created.json()["token"]) as http:
        made = await http.post("/api/v1/repositories", json={"name": "secure", "description": "over TLS"})
        listed = await http.get("/api/v1/repositories")
        got = await http.get("/api/v1/repositories/secure")
        tags = await http.get("/api/v1/repositories/secure/tags")  # tagging asks the registry, over TLS
        deleted = await http.delete("/api/v1/repositories/secure")  # the registry tells tagging, as a service
        after = await http.get("/api/v1/repositories/secure")
    assert made.status_code == 201, made.text
    assert [repo["name"] for repo in listed.json()["repositories"]] == ["secure"]
    assert got.status_code == 200 and got.json()["description"] == "over TLS", got.text
    assert tags.status_code == 200, tags.text
    assert deleted.status_code == 204, deleted.text
    assert after.status_code == 404


async def test_plain_http_and_unverified_clients_are_refused(tls_platform: tuple[Platform, Path]) -> None:
    platform, _ca = tls_platform
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient(timeout=10) as http:
            await http.get(platform.url.replace("https://", "http://") + "/healthz")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        async with httpx.AsyncClient(timeout=10) as http:  # the system's CAs only
            await http.get(platform.url + "/healthz")
    # `make run` checks the gateway it started against the certificate it gave it
    async with httpx.AsyncClient(timeout=10, verify=own_gateway_tls(platform.settings)) as http:
        assert (await http.get(platform.url + "/healthz")).json()["status"] == "ok"


async def test_grpc_needs_the_ca(tls_platform: tuple[Platform, Path]) -> None:
    platform, ca = tls_platform
    address = platform.settings.addr("registry")
    request = health_pb2.HealthCheckRequest()
    for channel in (
        grpc.aio.insecure_channel(address),
        grpc.aio.secure_channel(address, grpc.ssl_channel_credentials()),  # the system's CAs only
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await channel.close()
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca.read_bytes())) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        whoami = await registry_pb2_grpc.RegistryServiceStub(channel).Authenticate(
            registry_pb2.AuthenticateRequest(), metadata=(("authorization", f"Bearer {platform.admin_key}"),), timeout=5
        )
    assert whoami.api_key.is_admin
