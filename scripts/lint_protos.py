"""Run `buf lint` (STANDARD rules, no ignores) on protos/, with google/api resolved locally."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from gen_protos import GOOGLE_API_PROTOS  # noqa: E402


def main() -> int:
    import google.api

    target = ROOT / ".build" / "googleapis" / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for name in GOOGLE_API_PROTOS:
        shutil.copy(Path(google.api.__path__[0]) / name, target / name)
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or "buf"
    return subprocess.call([buf, "lint", "--path", "protos/vers"], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
