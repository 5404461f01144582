"""A run's folder: atomic checkpoints that resume exactly, the run record compared on resume, the saved models."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..model import CASModel
from ..serialization import atomic_write
from .config import EMA_WEIGHTS, RUN_RECORD, RunMismatchError, TrainingRecord, TrainState


def checkpoint_step(path: Path) -> int:
    """The step of a ``step-<N>`` checkpoint folder: rotation orders by it, not by name."""
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def record_differences(old, new, prefix: str = "") -> List[str]:
    """Dotted keys where two JSON-like records differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: not in the folder's run, {new[key]!r} now")
            elif key not in new:
                out.append(f"{where}: {old[key]!r} in the folder's run, not set now")
            else:
                out.extend(record_differences(old[key], new[key], where))
        return out
    return [] if old == new else [f"{prefix}: {old!r} in the folder's run, {new!r} now"]


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model's architecture: a hash of its state-dict names, shapes and dtypes, and its CAS setup."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    record = {"class": type(model).__name__, "parameters_sha256": h.hexdigest()[:16]}
    cas = getattr(model, "casify_config", None)
    if isinstance(cas, dict) and "cas" in cas:
        record["cas"] = json.loads(json.dumps(cas["cas"], default=str))
    return record


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class RunFolder:
    """The :class:`~casify.train.loop.Trainer`'s checkpoint and output-folder side (a mixin: it reads the trainer's
    accelerator, config, state, model and loss)."""

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Atomically write ``checkpoints/step-<N>`` (accelerate state + trainer state) and point ``latest`` at it."""
        acc = self.accelerator
        final = self.checkpoint_root / f"step-{self.state.global_step:08d}"
        tmp = self.checkpoint_root / f".tmp-step-{self.state.global_step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Accelerate's save_state (and its checkpoint naming/rotation) writes in place, not atomically: hence tmp + rename.
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every process has written its part (RNG states, FSDP shards) before the rename
        if acc.is_main_process:
            if self.ema is not None:
                from safetensors.torch import save_file
                save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()},
                          str(tmp / EMA_WEIGHTS))
            (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self.state), indent=1))
            atomic_replace_dir(tmp, final)
            atomic_write(self.checkpoint_root / "latest", lambda tmp: Path(tmp).write_text(final.name))
            kept = sorted((p for p in self.checkpoint_root.glob("step-*") if p.is_dir()), key=checkpoint_step)
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Optional[Path]:
        pointer = self.checkpoint_root / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def load_checkpoint(self, path: Path) -> None:
        if not (path / "custom_checkpoint_0.pkl").exists():
            raise RunMismatchError(f"{path} holds no learning-rate scheduler state (written by a casify before "
                                   "torch schedulers): resume it with that casify version, or start afresh")
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            from safetensors.torch import load_file
            if not (path / EMA_WEIGHTS).exists():
                raise RunMismatchError(f"{path} has no {EMA_WEIGHTS}: the run was saved without EMA")
            self.ema.load_state_dict(load_file(str(path / EMA_WEIGHTS), device=str(self.accelerator.device)))
        self.state = TrainState(**json.loads((path / "trainer_state.json").read_text()))

    # -- training -------------------------------------------------------------------------------------------------
    def _write_run_config(self) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {"identity": self.identity, "train": self.config.to_dict(), "loss": self.loss.config(),
                      "attack": self.attack.to_dict() if self.attack else None,
                      "val_attack": self.val_attack.to_dict(), "num_processes": self.accelerator.num_processes,
                      "global_batch_size": self.global_batch_size,
                      "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
            text = json.dumps(record, indent=1, default=str)
            atomic_write(self.output_dir / RUN_RECORD, lambda tmp: Path(tmp).write_text(text))

    def _holds_a_run(self) -> bool:
        return any((self.output_dir / name).exists() for name in (RUN_RECORD, "checkpoints", "best", "final"))

    def _check_output_dir(self, resume: bool, overwrite: bool) -> None:
        """Never reuse or mix another run: resume only the same run, start afresh only over a folder given up for it.

        Every process reads the folder before any process changes it (the barrier), so all decide alike."""
        clear = self._decide_output_dir(resume, overwrite)
        self.accelerator.wait_for_everyone()
        if clear and self.accelerator.is_main_process:
            for name in ("checkpoints", "best", "final", "hub", "logs"):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
            for name in (RUN_RECORD, "summary.json"):
                (self.output_dir / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _decide_output_dir(self, resume: bool, overwrite: bool) -> bool:
        """Whether the old run in ``output_dir`` must be deleted first; raises when the folder holds another run."""
        if not self._holds_a_run():
            return False
        afresh = ("choose another output_dir (the recipes name it after the run by default), or start afresh here "
                  "with resume=False, overwrite=True (recipes: --no_resume --overwrite), which deletes the old run")
        record_path = self.output_dir / RUN_RECORD
        old = None
        if record_path.exists():
            try:
                old = json.loads(record_path.read_text()).get("identity")
            except (json.JSONDecodeError, AttributeError):
                old = None
        if resume:
            if old is None:
                raise RunMismatchError(f"{self.output_dir} holds a run without a readable record of what it is "
                                       f"({RUN_RECORD}); it cannot be resumed safely: {afresh}")
            diff = record_differences(old, self.identity)
            if diff:
                shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
                raise RunMismatchError(f"{self.output_dir} holds another run; resuming it would train or publish that "
                                       f"run's weights as this one. What differs: {shown}. To run this one: {afresh}")
            return False
        if not overwrite:
            raise RunMismatchError(f"{self.output_dir} already holds a run and resume=False would mix its checkpoints "
                                   f"and models with this one's: {afresh}")
        return True

    def _checkpoint_due(self, end_of_epoch: bool, last: bool) -> bool:
        every = self.config.checkpoint_every_steps
        if every == 0:
            return False
        if every is None:
            return end_of_epoch or last
        return last or self.state.global_step % every == 0

    def _say_if_finished(self, resume: bool, latest: Optional[Path]) -> None:
        """A rerun of a finished run: say that there is nothing to train, or that it trains again from step 0 when
        the run kept no checkpoint to resume from."""
        if not (resume and self.accelerator.is_main_process):
            return
        if latest is not None and self.state.global_step >= self.total_steps:
            print(f"casify: {self.output_dir} holds this run, finished (step {self.state.global_step} of "
                  f"{self.total_steps}): nothing to train; its best/ and final/ models are kept")
        elif latest is None and (self.output_dir / "final").is_dir():
            warnings.warn(f"{self.output_dir} holds this run, finished, but without a checkpoint to resume from "
                          "(train.checkpoint_every_steps=0, or an older casify): it is trained again from step 0 (the "
                          "same seed gives the same weights). Keep the default checkpoint_every_steps (once per "
                          "epoch) to make reruns free", stacklevel=3)

    def _save_model(self, name: str, metrics: Optional[dict] = None) -> None:
        """``save_pretrained`` on the main process (every trained model is a casify model, with or without CAS).

        Under FSDP the parameters are sharded over the processes: every process takes part in gathering the full
        state dict (``accelerator.get_state_dict``), and the main process writes it."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self.eval_model
        state = None
        if self._sharded:  # a collective: every process gathers, the main process gets the full tensors
            state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            folder = self.output_dir / name
            training = TrainingRecord(
                config=self.config.to_dict(), loss=self.loss.config(),
                attack=self.attack.to_dict() if self.attack else None,
                selected_on=(f"held-out validation split ({'robust' if self.attack else 'natural'} accuracy)"
                             if name == "best" else "last step"),
                step=self.state.global_step,
                weights=f"EMA (decay {self.config.ema_decay})" if self.ema is not None else "trained",
                overfitting=self.state.overfitting)
            (model if state is None else FullWeights(model, state)).save_pretrained(
                folder, metrics=metrics, extra={"training": training.to_dict()})
        acc.wait_for_everyone()

    def _note_overfitting_in_saved_model(self, name: str) -> None:
        """Add the guard's record to the training record of a model saved before the collapse (its config.json, whose
        checksum covers the weights only), so its card says what happened to the run after it was selected."""
        acc = self.accelerator
        path = self.output_dir / name / "config.json"
        if acc.is_main_process and path.is_file():
            config = json.loads(path.read_text())
            if isinstance(config.get("training"), dict):
                config["training"]["overfitting"] = self.state.overfitting
                text = json.dumps(config, indent=2) + "\n"
                atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        acc.wait_for_everyone()

    @property
    def _sharded(self) -> bool:
        """Whether the parameters are sharded over the processes (FSDP), so ``state_dict()`` holds shards only."""
        from accelerate.utils import DistributedType
        return self.accelerator.distributed_type == DistributedType.FSDP


class FullWeights(nn.Module):
    """What ``save_pretrained`` reads from a sharded wrapped model: its config and original, and the gathered full
    state dict in place of ``state_dict()`` (whose tensors are shards under FSDP)."""

    def __init__(self, model: CASModel, state: Dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "casify_config", model.casify_config)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_state", state)

    @property
    def base_model(self) -> nn.Module:
        return self._model.base_model

    def state_dict(self, *args, **kwargs):
        return dict(self._state)

    def save_pretrained(self, save_directory, **kwargs):
        from ..serialization import save_pretrained
        return save_pretrained(self, save_directory, **kwargs)
