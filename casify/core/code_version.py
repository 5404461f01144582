"""Which code produced a run: casify's version and, for a git checkout, the commit and whether it had local changes.

Why: a comparison of two training arms means something only when both ran the same code; studies recorded no commit,
and runs of an older code version were once paired with today's (the study audit). Every run folder and every saved
model's training record carries this, and a study refuses to judge arms whose commits differ.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Dict, Optional

from ..version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on the machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> Dict[str, Optional[object]]:
    """``{"casify_version", "commit", "dirty"}``; commit and dirty are None for an installed (non-git) copy. Read once
    per process: a run's code cannot change under it. ``dirty`` counts changes to tracked files under the package's
    checkout (untracked files, such as run folders, do not make it dirty)."""
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"casify_version": __version__, "commit": commit, "dirty": dirty}


__all__ = ["code_version"]
