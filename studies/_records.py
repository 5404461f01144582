"""A study's records on disk: JSON written atomically and read back, the SHA-256 that ties a record to a model
file, and where each study's committed results live. Why a module of its own: every other part of the protocol
(the worker, the archive, the report) writes or reads these records, and none of them should import another for it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STUDIES = Path(__file__).resolve().parent


def results_of(study: str) -> Path:
    """``studies/<study>/results``: where a study's committed results live, so one study reads another's from its
    folder rather than through the other's script."""
    return STUDIES / study / "results"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: Path, record) -> None:
    """Atomically: a killed worker never leaves half a record."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["STUDIES", "read_json", "results_of", "sha256", "write_json"]
