"""Per-example results as a report keeps them, and the fingerprint of the images they were measured on, so that two
reports can be compared image by image later (:mod:`casify.evaluate.side_by_side`) without rerunning anything.

- The data's fingerprint: the SHA-256 of every example's bytes (its image as float32 in [0, 1], C-contiguous, then
  its label as int64), and the SHA-256 over those digests in the evaluation's order. Two evaluations with the same
  fingerprint saw the same images with the same labels in the same order, whatever the batch size, the number of
  processes or the file they were read from.
- Per-example flags are stored as one character per example, in the order of the report's ``data.indices``:
  ``1`` correct, ``0`` fooled, ``-`` not attacked (a cascade ran the row only on the examples every earlier row had
  left correct). A row's string says which examples it fooled; an example's column says which rows fooled it.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence

import torch

CORRECT, FOOLED, SKIPPED = "1", "0", "-"
ENCODING = ("one character per example, in the order of data.indices: 1 correct, 0 fooled, - not attacked (a "
            "cascade ran the row only on the examples every earlier row left correct)")
DATA_HASH = ("SHA-256 over the per-example SHA-256 digests, in the evaluation's order; an example's digest covers its "
             "image as float32 in [0, 1] (C-contiguous bytes) followed by its label as int64")


def example_digests(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, 32) uint8: each example's SHA-256 (see the module doc); computed on the host."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    y = torch.as_tensor(y).detach().to("cpu", torch.int64).reshape(-1)
    out = torch.empty(x.shape[0], 32, dtype=torch.uint8)
    for i in range(x.shape[0]):
        h = hashlib.sha256(x[i].numpy().tobytes())
        h.update(y[i].numpy().tobytes())
        out[i] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return out


def data_sha256(digests: torch.Tensor) -> str:
    """The data's fingerprint from the per-example digests, in order."""
    return hashlib.sha256(digests.to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()


def encode(flags: Sequence[Optional[bool]]) -> str:
    """Flags (True / False / None) as a string of ``1`` / ``0`` / ``-``."""
    return "".join(SKIPPED if f is None else (CORRECT if f else FOOLED) for f in flags)


def decode(text: str) -> List[Optional[bool]]:
    """The inverse of :func:`encode`; any other character is an error that names it."""
    table = {CORRECT: True, FOOLED: False, SKIPPED: None}
    try:
        return [table[c] for c in text]
    except KeyError as e:
        raise ValueError(f"per-example flags use only '1', '0' and '-', found {e.args[0]!r}") from None


def fooled_by(rows: Dict[str, Sequence[Optional[bool]]], position: int) -> List[str]:
    """The rows that fooled the example at ``position`` (in the report's order), in the order given."""
    return [name for name, flags in rows.items() if flags[position] is False]


def family_flags(per_example: Dict[str, Sequence[Optional[bool]]], families: Dict[str, dict]) -> Dict[str, List[bool]]:
    """Per family, an example is correct when every row of the family that ran on every example left it correct
    (the summary's family accuracy, per example)."""
    out = {}
    for name, family in families.items():
        columns = [per_example[row] for row in family["rows"]]
        out[name] = [all(bool(c[i]) for c in columns) for i in range(len(columns[0]))] if columns else []
    return out


__all__ = ["CORRECT", "DATA_HASH", "ENCODING", "FOOLED", "SKIPPED", "data_sha256", "decode", "encode",
           "example_digests", "family_flags", "fooled_by"]
