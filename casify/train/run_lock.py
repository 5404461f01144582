"""One process at a time in a run folder: two runs training into one folder would race on its checkpoints and on
``best/``, ``final/`` and ``hub/``, so the second is refused at once, with the holder named.

The lock is ``filelock``'s ``FileLock`` (an OS file lock, ``flock`` on POSIX): the kernel releases it when its process
dies, however it dies, so a lock left by a killed run is simply acquired by the next one. Who holds it (PID, host,
start time, command) is written beside it, for the refusal message; a holder record found on acquiring is one a
killed process left, and the take-over is reported.
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import sys
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock, Timeout

from ..io.serialization import atomic_write
from .config import RunFolderError

LOCK_NAME = ".casify-run.lock"
HOLDER_NAME = ".casify-run.lock.json"


# Deleting a flock file on release would let two processes hold "the" lock (one on the old inode, one on a new file):
# filelock 4 deletes it unless told not to; filelock 3 never deletes it on POSIX and has no such option.
_KEEP_LOCK_FILE = {"preserve_lock_file": True} if "preserve_lock_file" in inspect.signature(FileLock.__init__).parameters \
    else {}


class RunFolderLocked(RunFolderError):
    """Another process is training into the run folder."""


def read_holder(folder: Path) -> Optional[dict]:
    """The holder record beside the lock, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((folder / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: Optional[dict]) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[bool]:
    """Hold ``folder``'s lock for the block; yield whether this entry took it (False when this process already held
    it: the lock is re-entrant within a process, so a recipe may hold it around ``Trainer.train``, which takes it
    too). Raises :class:`RunFolderLocked` at once, naming the holder, when another process holds it."""
    lock = FileLock(str(folder / LOCK_NAME), timeout=0, is_singleton=True, thread_local=False, **_KEEP_LOCK_FILE)
    taken = not lock.is_locked
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise RunFolderLocked(
            f"{folder} is in use by another casify run ({describe_holder(read_holder(folder))}); two runs in one "
            "folder would overwrite each other's checkpoints and models: wait for it to end, or choose another "
            "output_dir") from None
    try:
        if taken:
            left = read_holder(folder)
            me = _this_process()
            if left and (left.get("pid"), left.get("host")) != (me["pid"], me["host"]):
                warnings.warn(f"{folder}: took over the lock left by {describe_holder(left)}, which ended without "
                              "releasing it (killed)", stacklevel=3)
            text = json.dumps(me, indent=1)
            atomic_write(folder / HOLDER_NAME, lambda tmp: Path(tmp).write_text(text))
        yield taken
    finally:
        if taken:
            (folder / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()
