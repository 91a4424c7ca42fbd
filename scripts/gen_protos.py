"""Generate the Python modules under gen/ from protos/ (run through `make gen`).

`python scripts/gen_protos.py OUT_DIR` writes elsewhere; the drift test uses that to compare.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GOOGLE_API_PROTOS = ("annotations.proto", "http.proto", "httpbody.proto", "field_behavior.proto")


def googleapis_include() -> Path:
    """A folder holding google/api/*.proto from the googleapis-common-protos package."""
    import google.api

    source = Path(google.api.__path__[0])
    include = Path(tempfile.mkdtemp(prefix="vers-googleapis-"))
    (include / "google" / "api").mkdir(parents=True)
    for name in GOOGLE_API_PROTOS:
        shutil.copy(source / name, include / "google" / "api" / name)
    return include


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    include = googleapis_include()
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        shutil.rmtree(include)
    for folder in (p for p in out_dir.rglob("*") if p.is_dir()):
        (folder / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "gen")
