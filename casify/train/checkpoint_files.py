"""The files of one checkpoint folder, read as data only: a checkpoint is written by one process and may be read back
after a crash, a full disk or a hand edit, so every file is checked against a SHA-256 manifest before any is used,
and nothing in it is unpickled as code.

- ``manifest.json``: every file of the folder with its size and SHA-256, written last; a file missing, empty, changed
  or added since (a pickle planted in the folder) makes the checkpoint refused (:func:`verify_checkpoint`).
- ``rng_state_<rank>.json`` + ``.safetensors``: each process's random generators (Python, NumPy, torch CPU and CUDA)
  and Accelerate's step counter, as JSON numbers and tensors. Accelerate keeps these in ``random_states_<rank>.pkl``,
  a pickle it reads back silently ignoring errors (a resume with fresh random state); casify deletes that file.
- ``scheduler.bin``: the learning-rate scheduler's ``state_dict`` (numbers, lists and a ``Counter``), read with
  ``torch.load(weights_only=True)``. Accelerate would keep it (``register_for_checkpointing``) in
  ``custom_checkpoint_0.pkl``, which it unpickles in full (weights_only off): a planted pickle would run.
- ``optimizer.bin``, ``scaler.pt``: written by Accelerate, read here with ``weights_only=True``; ``model.safetensors``
  cannot carry code.
"""
from __future__ import annotations

import json
import pickle
import random
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from ..io.serialization import atomic_write, sha256_file
from .config import RunFolderError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SCHEDULER_STATE = "scheduler.bin"
OPTIMIZER_STATE = "optimizer.bin"  # Accelerate's names (accelerate.utils.constants)
SCALER_STATE = "scaler.pt"
MODEL_WEIGHTS = "model.safetensors"
ACCELERATE_RNG_PICKLE = "random_states_{rank}.pkl"
MANIFEST_FORMAT = 1


class CheckpointError(RunFolderError):
    """A checkpoint that cannot be resumed exactly and safely: incomplete, altered, or in a format that can carry
    code."""


def _files(folder: Path) -> Dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def write_manifest(folder: Path) -> None:
    """Record every file of ``folder`` with its size and SHA-256 (written last, atomically)."""
    entries = {name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
               for name, path in _files(folder).items()}
    text = json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1)
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``folder`` that is missing, empty, changed or not in
    its manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST} (the SHA-256 of each file): it was written by an older "
                              "casify or was not finished, so it cannot be checked")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(entries, dict):
            raise ValueError("unknown format")
        expected = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path} is not a readable manifest ({e})") from None
    present = _files(folder)
    for name, (size, digest) in expected.items():
        path = present.get(name)
        if path is None:
            raise CheckpointError(f"{folder / name} is missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            state = "empty" if actual == 0 else f"{actual} bytes, not the {size} written"
            raise CheckpointError(f"{path} is {state} (truncated or replaced since it was written)")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} differs from the file written (its SHA-256 is not the one in {MANIFEST})")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise CheckpointError(f"{folder} holds files casify did not write there ({', '.join(extra[:5])}); a "
                              "checkpoint is read only as written, never with files added")


def load_torch_file(path: Path):
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only; anything that would need
    code to rebuild is refused with the file named."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} holds objects that need code to load ({first}); casify reads checkpoints "
                              "with weights_only=True only and does not run code from a run folder") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
                              "it is truncated or not a torch file") from None


def load_json_file(path: Path) -> dict:
    """A JSON object from ``path``; an empty, truncated or non-object file is refused with the file named."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise CheckpointError(f"{path} is empty")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): it is truncated or was edited") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


# -- random generators ------------------------------------------------------------------------------------------------
def save_rng_state(folder: Path, rank: int, accelerator_step: int) -> None:
    """This process's generators: Python and NumPy as JSON numbers, torch's as tensors."""
    from safetensors.torch import save_file
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    record = {"accelerator_step": int(accelerator_step),
              "python": {"version": version, "state": list(internal), "gauss": gauss},
              "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)}}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    base = folder / f"rng_state_{rank}"
    Path(f"{base}.json").write_text(json.dumps(record))
    save_file(tensors, f"{base}.safetensors")


def load_rng_state(folder: Path, rank: int) -> int:
    """Set this process's generators from ``rng_state_<rank>.*``; return Accelerate's step counter."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    base = folder / f"rng_state_{rank}"
    record = load_json_file(Path(f"{base}.json"))
    try:
        tensors = load_file(f"{base}.safetensors")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{base}.safetensors cannot be read ({e})") from None
    try:
        py, npy = record["python"], record["numpy"]
        python_state = (int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"])
        numpy_state = (str(npy["kind"]), np.asarray(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                       int(npy["has_gauss"]), float(npy["cached_gaussian"]))
        step = int(record["accelerator_step"])
        cpu = tensors["torch_cpu"]
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count())
                if f"torch_cuda_{i}" in tensors] if torch.cuda.is_available() else []
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{base}.json / .safetensors do not hold this process's random generator states "
                              f"({type(e).__name__}: {e})") from None
    return step


def remove_accelerate_pickles(folder: Path, rank: int) -> None:
    """Accelerate's own RNG pickle is replaced by :func:`save_rng_state`: keep no pickle in a checkpoint."""
    (folder / ACCELERATE_RNG_PICKLE.format(rank=rank)).unlink(missing_ok=True)


__all__ = ["CheckpointError", "MANIFEST", "TRAINER_STATE", "load_json_file", "load_rng_state", "load_torch_file",
           "remove_accelerate_pickles", "save_rng_state", "verify_checkpoint", "write_manifest"]
