"""Named crash points for the crash-safety tests: `VERS_FAULT_POINT=commit.after_snapshot` makes the process
that reaches that point end at once, as `kill -9` would. Unset (as in every deployment) they do nothing."""

from __future__ import annotations

import os
import sys

FAULT_EXIT_CODE = 86


def fault_point(name: str) -> None:
    if os.environ.get("VERS_FAULT_POINT") == name:
        print(f"fault point {name}: exiting", file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)
