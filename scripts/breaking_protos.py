"""`buf breaking` on protos/ against protos-baseline.binpb, the protos as last released.

    python scripts/breaking_protos.py              # `make breaking-protos`, part of `make lint`: the check
    python scripts/breaking_protos.py --update     # `make protos-baseline`: the baseline from HEAD's protos
    python scripts/breaking_protos.py --update REV # ... from another commit or tag

The baseline is a buf image (the descriptors of protos/vers and their imports, without source info) committed
beside the protos, so the check works in any clone, shallow or without tags. An intended breaking change is
made in two steps: commit the changed protos, then run `make protos-baseline`, which builds the image from
the protos/ and buf.yaml of HEAD (never from uncommitted files), and commit protos-baseline.binpb. From then
on the check compares against that release.

The rules are buf.yaml's `breaking` set, FILE: wire and JSON compatibility, and every type stays in the file
that declares it. The generated code is per file (a Python client imports vers.tagging.v1.tagging_pb2), so a
message moved to another file of the same package, which the PACKAGE set allows, breaks its importers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "protos-baseline.binpb"
sys.path.insert(0, str(ROOT / "scripts"))

from lint_protos import prepare_workspace  # noqa: E402


def check() -> int:
    if not BASELINE.exists():
        print(f"{BASELINE.name} is missing: build it from the released protos with `make protos-baseline`", file=sys.stderr)
        return 1
    buf = prepare_workspace()
    # The baseline carries google/api and google/protobuf as imports; only our own files are compared.
    code = subprocess.call([buf, "breaking", "--exclude-imports", "--against", BASELINE.name], cwd=ROOT)
    if code != 0:
        print(
            f"protos/ breaks compatibility with {BASELINE.name} (above). Keep the old fields and RPCs, or, for an "
            f"intended break, commit the protos and then run `make protos-baseline` and commit {BASELINE.name}",
            file=sys.stderr,
        )
    return code


def update(rev: str) -> int:
    with tempfile.TemporaryDirectory(prefix="vers-protos-baseline-") as folder:
        tree = Path(folder)
        archive = tree / "protos.tar"
        exported = subprocess.run(
            ["git", "archive", f"--output={archive}", rev, "protos", "buf.yaml"], cwd=ROOT, capture_output=True, text=True
        )
        if exported.returncode != 0:
            print(f"cannot read protos/ and buf.yaml at {rev!r}: {exported.stderr.strip()}", file=sys.stderr)
            return 1
        subprocess.run(["tar", "-xf", archive.name], cwd=tree, check=True)
        buf = prepare_workspace(tree)
        code = subprocess.call([buf, "build", "--path", "protos/vers", "--exclude-source-info", "-o", str(BASELINE)], cwd=tree)
    if code == 0:
        print(f"wrote {BASELINE.name} from the protos of {rev}: commit it")
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["--update"] and len(argv) <= 2:
        return update(argv[1] if len(argv) == 2 else "HEAD")
    if argv:
        print("usage: breaking_protos.py [--update [REV]]", file=sys.stderr)
        return 2
    return check()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
