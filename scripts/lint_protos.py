"""Run `buf lint` (STANDARD rules, no ignores) on protos/, with google/api resolved locally."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gen_protos import GOOGLE_API_PROTOS  # noqa: E402


def prepare_workspace(root: Path = ROOT) -> str:
    """Copy google/api/*.proto into `root`/.build/googleapis, the second module of buf.yaml's workspace, and
    return the buf executable (the virtualenv's, from the buf-bin package)."""
    import google.api

    target = root / ".build" / "googleapis" / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for name in GOOGLE_API_PROTOS:
        shutil.copy(Path(google.api.__path__[0]) / name, target / name)
    return shutil.which("buf", path=str(Path(sys.executable).parent)) or "buf"


def main() -> int:
    buf = prepare_workspace()
    return subprocess.call([buf, "lint", "--path", "protos/vers"], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
