"""Output folders of the command line (``casify eval --out``, ``casify analyze --out``): never stale, never clobbered.

A run's files appear all at once or not at all, and never beside the files of an earlier run:

- a missing or empty folder is used;
- a non-empty folder is refused, unless ``--overwrite`` is given *and* the folder carries casify's marker file
  (:data:`MARKER`, written into every output folder with the command, its arguments and the time); then the whole
  folder is replaced, so nothing of the earlier run survives;
- a non-empty folder without the marker is refused even with ``--overwrite``: casify deletes only what it wrote.

Files are written into a fresh sibling folder (``.<name>.casify-partial-<random>``) that is renamed onto the target when
the run has finished, so a crash, an error or Ctrl-C mid-write leaves the earlier folder untouched and no half-written
report under the target's name. The check runs before any work (:func:`prepare_output_dir`, so a long evaluation is
not lost to a refusal at the end) and again at the rename.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

MARKER = ".casify-output.json"
PARTIAL = "casify-partial"
_SHOWN = 5  # files named in an error message


class OutputDirError(Exception):
    """An output folder casify must not write into (not empty, not casify's, not a folder)."""


def read_marker(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The marker of a folder casify wrote (a dict with ``"tool": "casify"``), else None."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "casify" else None


def _listing(path: Path) -> str:
    """A few of the folder's entries for a message (casify's own marker is not listed: it is no one's data)."""
    names = sorted((p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if p.name != MARKER),
                   key=lambda n: (n.startswith("."), n))
    if not names:
        return f"only {MARKER}"
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _holds_cwd(path: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == path or path in cwd.parents


def prepare_output_dir(path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """Check that a new report may go to ``path`` and return it (absolute, symlinks resolved). Changes nothing (a
    probe folder is made and removed).

    A missing or empty folder passes. A non-empty one raises :class:`OutputDirError` naming a few of its files, unless
    ``overwrite`` is true and the folder carries casify's marker (:data:`MARKER`): then it passes and is replaced,
    as a whole, when the new report is committed (:func:`output_dir`). Without the marker it is refused even with
    ``overwrite``. A folder that cannot be written (nor its parent) is refused too.
    """
    raw = Path(path).expanduser()
    target = raw.resolve()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"--out {raw} is a file, not a folder; choose a folder for the report")
    _check_writable(raw, target)
    if not target.exists() or not any(target.iterdir()):
        return target
    files = _listing(target)
    marker = read_marker(target)
    if marker is None:
        raise OutputDirError(
            f"--out {raw} is not empty ({files}) and casify did not write it (it has no {MARKER} marker); casify "
            f"will not delete files it did not write, so --overwrite does not apply here: choose another --out (a "
            f"new or empty folder), or empty this one yourself")
    if not overwrite:
        earlier = " ".join(str(x) for x in [marker.get("command"), marker.get("created")] if x)
        raise OutputDirError(
            f"--out {raw} is not empty ({files}): it holds an earlier casify output"
            + (f" ({earlier})" if earlier else "")
            + "; pass --overwrite to replace it (its files are all deleted), or choose another --out")
    if _holds_cwd(target):
        raise OutputDirError(f"--out {raw} is (or contains) the current directory; casify will not replace it, "
                             "choose another --out")
    return target


def _check_writable(raw: Path, target: Path) -> None:
    """The report is staged beside ``target`` and renamed onto it: make and remove a probe folder where the staging
    folder will go (the nearest folder that exists), so an unwritable ``--out`` fails now, not after the evaluation.
    A probe, not ``os.access``: root passes every permission test, yet cannot write to a read-only file system."""
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"--out {raw} lies under {existing}, which is a file, not a folder; choose another --out")
    probe = _sibling(existing / target.name, "casify-write-probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OutputDirError(f"--out {raw} cannot be written ({e.strerror or e} in {existing}); choose a folder you "
                             "can write to") from None


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}"


def _marker(command: str, argv: Optional[Sequence[str]], folder: Path) -> dict:
    from ..version import __version__
    files: List[str] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return {"tool": "casify", "command": command, "argv": list(argv) if argv is not None else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "casify_version": __version__,
            "files": files}


def commit_output_dir(staging: Path, target: Path, overwrite: bool, *, command: str = "",
                      argv: Optional[Sequence[str]] = None) -> Path:
    """Write the marker into ``staging`` and rename it onto ``target`` (checked again first). An earlier casify
    output at ``target`` (with ``overwrite``) is moved aside, replaced and deleted; on any failure the earlier folder
    is put back and ``staging`` is kept, and the error says where the new files are."""
    try:
        prepare_output_dir(target, overwrite)
    except OutputDirError as e:
        raise OutputDirError(f"{e}. (The folder changed during the run; this run's files are in {staging})") from None
    (staging / MARKER).write_text(json.dumps(_marker(command, argv, staging), indent=1) + "\n")
    old = None
    if target.exists():
        if any(target.iterdir()):  # an earlier casify output, and overwrite is set (checked above)
            old = _sibling(target, "casify-old")
            os.rename(target, old)
        else:
            target.rmdir()
    try:
        os.rename(staging, target)
    except OSError as e:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise OutputDirError(f"could not move the new report into {target} ({e}); its files are in {staging}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def output_dir(path: Union[str, os.PathLike], overwrite: bool = False, *, command: str = "",
               argv: Optional[Sequence[str]] = None) -> Iterator[Path]:
    """Check ``path`` now (:func:`prepare_output_dir`), yield a fresh staging folder to write the report into, and
    on a clean exit commit it onto ``path`` with the marker (:func:`commit_output_dir`). On an exception (Ctrl-C
    included) the staging folder is deleted and ``path`` is left as it was.

        with output_dir(args.out, args.overwrite, command="eval", argv=argv) as tmp:
            report.save(tmp)
    """
    target = prepare_output_dir(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, PARTIAL)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_output_dir(staging, target, overwrite, command=command, argv=argv)

