"""Which code a benchmark measured: the commit every results file records."""
from __future__ import annotations

import os
import subprocess
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_commit() -> Optional[str]:
    """ANYEXPERTS_COMMIT where set (a copied tree whose .git is older than its files, as on
    the lent GPU machines), else git's HEAD; None outside a checkout."""
    commit = os.environ.get("ANYEXPERTS_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
