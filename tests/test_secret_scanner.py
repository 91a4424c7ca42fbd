"""The secret scanner on a commit made by hand, no VM: an ext4 image disk (the base), a qcow2 layer over it
holding what an organisation's VM changed (written with debugfs into a copy of the disk, then kept as the
clusters that differ from the base), and a memory file with keys at known offsets."""

from __future__ import annotations

import random
import secrets
import shutil
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.orchestrator.secrets import FREE_SPACE, RULES_VERSION, Finding, scan_commit

MIB = 1 << 20
UPPER_DIGITS = string.ascii_uppercase + "234567"
BASE64 = string.ascii_letters + string.digits + "+/"


def run(*command: str | Path) -> None:
    subprocess.run([str(part) for part in command], check=True, capture_output=True)


def fake_aws_pair() -> tuple[str, str]:
    key_id = "AKIA" + "".join(random.choices(UPPER_DIGITS, k=16))
    secret = "".join(random.choices(BASE64, k=38)) + "a7"
    return key_id, secret


def fake_private_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()


def vers_key() -> str:
    return "vers_" + secrets.token_urlsafe(32)


def debugfs_write(disk: Path, folder: Path, files: dict[str, str]) -> None:
    """Write files into an ext4 disk image, as a VM would (the parent folders are made first)."""
    requests = []
    for number, (guest_path, content) in enumerate(files.items()):
        local = folder / f"file-{number}"
        local.write_text(content)
        parts = guest_path.strip("/").split("/")
        requests += [f"mkdir /{'/'.join(parts[:depth])}" for depth in range(1, len(parts))]
        requests.append(f"write {local} {guest_path}")
    script = folder / "debugfs.script"
    script.write_text("\n".join(requests) + "\n")
    run("debugfs", "-w", "-f", script, disk)


@dataclass
class Commit:
    disk: Path  # the guest disk as the VM left it (raw), for expected offsets
    base: Path
    layer: Path
    memory: Path
    secrets: dict[str, str]
    memory_offsets: dict[str, int]

    def disk_offset(self, text: str) -> int:
        offset = self.disk.read_bytes().find(text.encode())
        assert offset >= 0, f"{text[:12]}... is not on the disk"
        return offset


@pytest.fixture(scope="module")
def commit(tmp_path_factory: pytest.TempPathFactory) -> Commit:
    folder = tmp_path_factory.mktemp("secret-scan")
    image, base_key_id = folder / "image", fake_aws_pair()[0]
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "motd").write_text("Welcome\n" * 100)
    # In the image only: the layer never holds it, so it is no organisation's secret.
    (image / "etc" / "image.env").write_text(f"IMAGE_KEY_ID={base_key_id}\n")
    base = folder / "base.raw"
    run("truncate", "-s", f"{24 * MIB}", base)
    run("mkfs.ext4", "-q", "-F", "-d", image, base)  # 1 KiB blocks, as the platform's small images have

    disk = folder / "disk.raw"
    shutil.copyfile(base, disk)
    key_id, secret = fake_aws_pair()
    deleted_id = fake_aws_pair()[0]
    allowed_key, memory_key = vers_key(), vers_key()
    private_key, host_key = fake_private_key(), fake_private_key()
    debugfs_write(disk, folder, {
        "/root/.ssh/id_ed25519": private_key,
        "/srv/app/.env": f"# the app\nDEBUG=1\nAWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\nDB_PASSWORD=$DB_PASSWORD\n",
        "/srv/app/README": "Set DB_PASSWORD=changeme in .env; token=your-token-here\n" * 20,
        "/tmp/scratch.txt": f"export ROTATED_KEY_ID={deleted_id}\n",
        "/opt/ci/token": f"{allowed_key}\n",
        "/opt/ci/host_key": host_key,
    })  # fmt: skip
    run("debugfs", "-w", "-R", "rm /tmp/scratch.txt", disk)
    layer = folder / "layer.qcow2"
    # Only the clusters that differ from the image go into the layer, as with a VM's copy-on-write writes.
    run("qemu-img", "convert", "-O", "qcow2", "-B", base, "-F", "raw", disk, layer)

    memory = folder / "ram"
    # "cut": the allowed host key's first 300 bytes at the end of a page, as a process's heap copy of it may
    # be cut by where the next page of it lies
    offsets = {"aws": 1 * MIB + 123, "vers": 5 * MIB + 4093, "allowed": 6 * MIB + 11, "cut": 7 * MIB - 300}
    memory_id = fake_aws_pair()[0]
    with open(memory, "wb") as ram:
        ram.truncate(8 * MIB)
        copies = (
            ("aws", f"\x00\x07{memory_id}\x00"),
            ("vers", f"Bearer {memory_key}\r\n"),
            ("allowed", allowed_key),
            ("cut", host_key[:300]),
        )
        for name, text in copies:
            ram.seek(offsets[name])
            ram.write(text.encode())
    offsets = {"aws": offsets["aws"] + 2, "vers": offsets["vers"] + 7, "allowed": offsets["allowed"], "cut": offsets["cut"]}
    return Commit(disk, base, layer, memory, {
        "base_key_id": base_key_id, "key_id": key_id, "secret": secret, "deleted_id": deleted_id, "allowed": allowed_key,
        "memory_key": memory_key, "memory_id": memory_id, "private_key": private_key,
    }, offsets)  # fmt: skip


def by_rule(findings: list[Finding], where: str) -> dict[str, list[Finding]]:
    found: dict[str, list[Finding]] = {}
    for finding in findings:
        if finding.where == where:
            found.setdefault(finding.rule, []).append(finding)
    return found


def assert_redacted(finding: Finding, secret: str) -> None:
    assert finding.excerpt.endswith("*")
    assert secret not in finding.excerpt
    assert secret[-8:] not in finding.excerpt


async def test_disk_findings_name_their_files_and_offsets(commit: Commit) -> None:
    findings = await scan_commit([], [commit.layer], commit.base, ["/opt/ci/*"])
    disk = by_rule(findings, "disk")
    assert sorted(disk) == ["aws-access-key-id", "aws-secret-access-key", "private-key"], findings

    key = disk["private-key"][0]
    assert (key.path, key.offset) == ("/root/.ssh/id_ed25519", commit.disk_offset("-----BEGIN OPENSSH PRIVATE KEY-----"))
    assert key.excerpt.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert_redacted(key, commit.secrets["private_key"].splitlines()[1])

    ids = {finding.path: finding for finding in disk["aws-access-key-id"]}
    assert set(ids) == {"/srv/app/.env", FREE_SPACE}, ids
    assert ids["/srv/app/.env"].offset == commit.disk_offset(commit.secrets["key_id"])
    assert ids[FREE_SPACE].offset == commit.disk_offset(commit.secrets["deleted_id"])  # the deleted file's
    for finding in ids.values():
        assert finding.excerpt.startswith("AKIA")
    assert_redacted(ids["/srv/app/.env"], commit.secrets["key_id"])

    [secret] = disk["aws-secret-access-key"]
    assert (secret.path, secret.offset) == ("/srv/app/.env", commit.disk_offset(f"AWS_SECRET_ACCESS_KEY={commit.secrets['secret']}"))
    assert secret.excerpt.startswith("AWS_SECRET_ACCESS_KEY=")
    assert_redacted(secret, commit.secrets["secret"])
    # Neither the image's own key nor the allowed path, placeholders or variables.
    assert not any(commit.secrets["base_key_id"][4:10] in finding.excerpt for finding in findings)
    assert not any(finding.path.startswith("/opt/ci/") for finding in findings)


async def test_memory_findings_give_offsets_and_skip_allowed_secrets(commit: Commit) -> None:
    findings = await scan_commit([commit.memory], [commit.layer], commit.base, ["/opt/ci/*"])
    memory = by_rule(findings, "memory")
    assert sorted(memory) == ["aws-access-key-id", "vers-api-key"], findings
    [aws] = memory["aws-access-key-id"]
    assert (aws.path, aws.offset) == ("", commit.memory_offsets["aws"])
    assert_redacted(aws, commit.secrets["memory_id"])
    # The allowed file's key is in memory too (read into the page cache): dropped with the file's finding.
    [vers] = memory["vers-api-key"]
    assert (vers.path, vers.offset) == ("", commit.memory_offsets["vers"])
    assert vers.excerpt.startswith("vers_")
    assert_redacted(vers, commit.secrets["memory_key"])


async def test_without_allowed_paths_the_file_and_its_copy_in_memory_are_reported(commit: Commit) -> None:
    findings = await scan_commit([commit.memory], [commit.layer], commit.base, [])
    keys = [(finding.where, finding.path, finding.offset) for finding in findings if finding.rule == "vers-api-key"]
    assert ("disk", "/opt/ci/token", commit.disk_offset(commit.secrets["allowed"])) in keys
    assert ("memory", "", commit.memory_offsets["allowed"]) in keys
    cut = [(finding.where, finding.offset) for finding in findings if finding.rule == "private-key"]
    assert ("memory", commit.memory_offsets["cut"]) in cut, findings


async def test_only_what_the_layer_changed_is_reported(tmp_path: Path) -> None:
    """A layer holds whole clusters: image bytes rewritten unchanged are not the organisation's secrets; a
    compressed cluster is read decompressed; placeholders and variables are no secrets."""
    image_key, org_key = fake_aws_pair()[0], fake_aws_pair()[0]
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "image.env").write_text(f"IMAGE_KEY_ID={image_key}\n")
    (image / "etc" / "HOWTO").write_text(
        "export GITHUB_TOKEN=${GITHUB_TOKEN}\npassword=%s\nAPI_KEY=<your key>\nSECRET_KEY=example-secret-key\n"
        "-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----\n"
    )
    base = tmp_path / "base.raw"
    run("truncate", "-s", f"{16 * MIB}", base)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", image, base)
    disk = base.read_bytes()
    image_offset = disk.find(image_key.encode())
    cluster = image_offset & ~0xFFFF
    (tmp_path / "same").write_bytes(disk[cluster : cluster + 0x10000])
    planted = bytearray((b"GET /health 200 2ms\n" * 0x1000)[:0x10000])  # compressible, so stored compressed
    planted[0x1234 : 0x1234 + 22] = f" {org_key}\n".encode()
    (tmp_path / "planted").write_bytes(planted)
    layer = tmp_path / "layer.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", layer)
    run("qemu-io", "-c", f"write -s {tmp_path / 'same'} {cluster} 64k", "-c", f"write -c -s {tmp_path / 'planted'} 12M 64k", layer)
    check = subprocess.run(["qemu-img", "check", "--output=json", str(layer)], capture_output=True, check=True, text=True)
    assert '"compressed-clusters": 1' in check.stdout
    memory = tmp_path / "ram"
    memory.write_bytes(random.randbytes(2 * MIB))

    findings = await scan_commit([memory], [layer], base, [])
    assert findings == [Finding("disk", FREE_SPACE, 12 * MIB + 0x1235, "aws-access-key-id", findings[0].excerpt)], findings
    # Without the base to compare with, the image's key in the rewritten cluster would pass for the layer's.
    unknown_base = await scan_commit([], [layer], None, [])
    assert [(f.path, f.offset) for f in unknown_base] == [("/etc/image.env", image_offset), (FREE_SPACE, 12 * MIB + 0x1235)]
    # The same image as a disk of its own, all of it written by its owner: its key, no placeholder.
    whole = tmp_path / "whole.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", base, whole)
    [finding] = await scan_commit([], [whole], None, [])
    assert (finding.path, finding.offset, finding.rule) == ("/etc/image.env", image_offset, "aws-access-key-id")
    assert RULES_VERSION.startswith("detect-secrets-")
