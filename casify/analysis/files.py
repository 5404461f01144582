"""Atomic file writes, shared by the figures, the t-SNE plot and the report: a reader (or a crash halfway) never
leaves a half-written file under its final name."""
from __future__ import annotations

from pathlib import Path

from ..io.serialization import atomic_write


def write_atomic(path: Path, write) -> Path:
    """``write(tmp_path)``, then rename onto ``path``: a reader never sees a half-written file under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write(Path(tmp)))
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """``text`` into ``path``, atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))
