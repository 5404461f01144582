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


# What counts as the code: the package, its launcher and the study scripts; not what a study writes (results,
# reports, models, archived run records), so a report rewritten mid-study does not mark later runs as run from a changed tree. Untracked
# files count: a defense or attack file dropped into its folder is imported by the package.
CODE_PATHS = ("casify", "casify_cli.py", "studies", ":(exclude,glob)studies/*/results/**",
              ":(exclude,glob)studies/*/models/**", ":(exclude,glob)studies/*/runs/**",
              ":(exclude,glob)studies/*/README.md", ":(exclude,glob)**/__pycache__/**")


@functools.lru_cache(maxsize=1)
def code_version() -> Dict[str, Optional[object]]:
    """``{"casify_version", "commit", "dirty"}``; commit and dirty are None for a copy of casify that is not tracked
    by a git checkout (an installed package). Read once per process: a run's code cannot change under it. ``dirty``:
    a change, tracked or not, to the code paths (:data:`CODE_PATHS`) of that checkout."""
    top = _git("rev-parse", "--show-toplevel")
    tracked = top is not None and _git("ls-files", "--error-unmatch", str(Path(__file__).resolve())) is not None
    if not tracked:  # e.g. a site-packages copy inside some other repository: that repository's commit is not ours
        return {"casify_version": __version__, "commit": None, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    status = _git("-C", top, "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS)
    return {"casify_version": __version__, "commit": commit, "dirty": None if status is None else bool(status)}


__all__ = ["code_version"]
