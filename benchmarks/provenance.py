"""Which code a result came from: the commit every benchmark's JSON records."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD of the repository (with "+dirty" when tracked files differ from it), else $ULSWEEP_COMMIT (a copied
    tree without .git, as on the device machine)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ULSWEEP_COMMIT", "unknown")
    return head + ("+dirty" if dirty else "")
