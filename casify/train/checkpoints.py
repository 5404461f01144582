"""A run's folder: atomic checkpoints that resume exactly, the run record compared on resume, the saved models."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..model.defended import DefendedModel
from ..core.code_version import code_version
from ..io.serialization import TEMP_MARK, atomic_write
from .checkpoint_files import (MODEL_WEIGHTS, OPTIMIZER_STATE, SCALER_STATE, SCHEDULER_STATE, TRAINER_STATE,
                               CheckpointError, load_json_file, load_rng_state, load_torch_file,
                               remove_accelerate_pickles, save_rng_state, verify_checkpoint, write_manifest)
from .config import EMA_WEIGHTS, RUN_RECORD, RunFolderError, RunMismatchError, TrainingRecord, TrainState

from .run_lock import run_folder_lock
from .sharded_checkpoint import verify_sharded_checkpoint

CHECKPOINT_NAME = re.compile(r"step-\d{8}")
OLDER_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}")  # tempfile.mkstemp's name for atomic_write before TEMP_MARK


def checkpoint_step(path: Path) -> int:
    """The step of a ``step-<N>`` checkpoint folder: rotation orders by it, not by name."""
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def current_names(identity):
    """A recorded run identity with 0.1.0's class name of the wrapped model read as today's (the same class)."""
    from ..defenses.cas import LEGACY_MODEL_CLASS
    model = identity.get("model") if isinstance(identity, dict) else None
    if isinstance(model, dict) and model.get("class") == LEGACY_MODEL_CLASS:
        return {**identity, "model": {**model, "class": "DefendedModel"}}
    return identity


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
    record = {"class": type(model).__name__,
              "parameters_sha256": h.hexdigest()[:16]}
    cas = getattr(model, "casify_config", None)
    if isinstance(cas, dict) and "cas" in cas:
        record["cas"] = json.loads(json.dumps(cas["cas"], default=str))
    return record


_OS_ERRORS = {errno.ENOSPC: "no space is left on the device", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission is denied",
              errno.EPERM: "permission is denied",
              errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (255 bytes a name)",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a file is in the way of a folder"}


def run_folder_error(e: OSError, path: Path, what: str) -> RunFolderError:
    """One line for a file-system error while writing the run folder: what failed, where, and what to do."""
    reason = _OS_ERRORS.get(e.errno, e.strerror or type(e).__name__)
    fix = {errno.ENOSPC: "free space, or choose an output_dir on another disk, and rerun the same command (it resumes "
                         "from the last intact checkpoint)",
           errno.EDQUOT: "free space and rerun the same command (it resumes from the last intact checkpoint)",
           errno.ENAMETOOLONG: "choose a shorter output_dir (each folder name at most 255 bytes)",
           errno.ENOTDIR: "output_dir must be a folder (or not exist yet): choose another one, or move the file away",
           errno.EEXIST: "output_dir must be a folder (or not exist yet): choose another one, or move the file away",
           }.get(e.errno, "choose an output_dir you can write to")
    where = e.filename or path
    return RunFolderError(f"cannot write {what} to {where}: {reason}; {fix}")


@contextlib.contextmanager
def writing(path: Path, what: str, partial: Optional[Path] = None):
    """File-system errors while writing ``what`` become one :class:`RunFolderError` line; ``partial`` (a temporary
    folder being written) is deleted, so a full disk is not left fuller."""
    try:
        yield
    except OSError as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise run_folder_error(e, path, what) from e


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
        """Atomically write ``checkpoints/step-<N>`` (model, optimizer, scheduler, RNG states, trainer state, EMA,
        and last the SHA-256 manifest of them all) and point ``latest`` at it."""
        acc = self.accelerator
        final = self.checkpoint_root / f"step-{self.state.global_step:08d}"
        tmp = self.checkpoint_root / f".tmp-step-{self.state.global_step:08d}"
        with writing(self.checkpoint_root, "a checkpoint", partial=tmp):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            # Accelerate's save_state (and its checkpoint naming/rotation) writes in place, not atomically: hence
            # tmp + rename. It writes the model (safetensors), the optimizer and the fp16 scaler (torch.save, read
            # back with weights_only=True); the RNG states go to JSON + safetensors in place of its pickle.
            acc.save_state(str(tmp), safe_serialization=True)
            save_rng_state(tmp, acc.process_index, acc.step)
            remove_accelerate_pickles(tmp, acc.process_index)
            acc.wait_for_everyone()  # every process has written its part (RNG states, FSDP shards) before the rename
            if acc.is_main_process:
                torch.save(self.scheduler.state_dict(), str(tmp / SCHEDULER_STATE))
                if self.ema is not None:
                    from safetensors.torch import save_file
                    save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()},
                              str(tmp / EMA_WEIGHTS))
                (tmp / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(self.state), indent=1))
                write_manifest(tmp)
                atomic_replace_dir(tmp, final)
                atomic_write(self.checkpoint_root / "latest", lambda tmp: Path(tmp).write_text(final.name))
                kept = sorted((p for p in self.checkpoint_root.glob("step-*") if p.is_dir()), key=checkpoint_step)
                for old in kept[: -self.config.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Optional[Path]:
        """The folder ``checkpoints/latest`` names, when it names a checkpoint folder of this run (not verified)."""
        pointer = self.checkpoint_root / "latest"
        try:
            name = pointer.read_text().strip()
        except OSError:
            return None
        path = self.checkpoint_root / name
        return path if CHECKPOINT_NAME.fullmatch(name) and path.is_dir() and not path.is_symlink() else None

    def resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint to resume from: the one ``latest`` names when it is intact (:func:`verify_checkpoint`),
        else the newest intact one, with a warning that says what was wrong. None for a run with no checkpoint at
        all; :class:`CheckpointError` when checkpoints were written but none is intact (never a silent step 0)."""
        root = self.checkpoint_root
        pointer = root / "latest"
        problems: List[str] = []
        named = None
        if pointer.exists() or pointer.is_symlink():
            try:
                name = pointer.read_text().strip()
            except OSError as e:
                name = None
                problems.append(f"{pointer} cannot be read ({e.strerror or e})")
            if name is not None:
                if not name:
                    problems.append(f"{pointer} is empty")
                elif not CHECKPOINT_NAME.fullmatch(name):
                    problems.append(f"{pointer} names {name[:80]!r}, not a step-<N> folder of {root}")
                elif not (root / name).is_dir() or (root / name).is_symlink():
                    problems.append(f"{pointer} names {name}, which is not a folder in {root}")
                else:
                    named = root / name
        candidates = sorted((p for p in root.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()
                             and not p.is_symlink()), key=checkpoint_step, reverse=True) if root.is_dir() else []
        if named is None and not problems and not candidates:
            return None  # no checkpoint was ever written: a fresh run
        if not pointer.exists() and not pointer.is_symlink():
            problems.append(f"{pointer} is missing")
        chosen = None
        for path in ([named] if named is not None else []) + [p for p in candidates if p != named]:
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            chosen = path
            break
        if chosen is None:
            raise CheckpointError(
                f"{root} holds no intact checkpoint to resume from ({'; '.join(problems)}). Training again from step "
                "0 would not continue the run that was saved: restore the files, or start afresh with resume=False, "
                "overwrite=True (recipes: --no_resume --overwrite), which deletes the old run")
        if problems and self.accelerator.is_main_process:
            warnings.warn(f"resuming from {chosen}, the newest intact checkpoint, not the latest: "
                          f"{'; '.join(problems)}", stacklevel=4)
        return chosen

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, RNG states, EMA and trainer state from ``path``, after checking its
        manifest; every file is read as data (safetensors, JSON, ``torch.load(weights_only=True)``)."""
        verify_checkpoint(path)
        acc = self.accelerator
        if self._sharded:  # the model and optimizer shards (torch.distributed.checkpoint), through Accelerate
            verify_sharded_checkpoint(path)  # DCP unpickles its metadata and non-tensor items: checked as data first
            acc.load_state(str(path), load_kwargs={"weights_only": True})
        else:
            from safetensors import SafetensorError
            from safetensors.torch import load_model
            try:
                load_model(self.model, str(path / MODEL_WEIGHTS), strict=True, device="cpu")
                self.optimizer.load_state_dict(load_torch_file(path / OPTIMIZER_STATE))
                if acc.scaler is not None:
                    acc.scaler.load_state_dict(load_torch_file(path / SCALER_STATE))
            except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{path} does not fit this run's model and optimizer ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:300]})") from None
        try:
            self.scheduler.load_state_dict(load_torch_file(path / SCHEDULER_STATE))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path / SCHEDULER_STATE} is not this run's learning-rate scheduler state "
                                  f"({type(e).__name__}: {e})") from None
        acc.step = load_rng_state(path, acc.process_index)
        if self.ema is not None:
            from safetensors.torch import load_file
            if not (path / EMA_WEIGHTS).exists():
                raise RunMismatchError(f"{path} has no {EMA_WEIGHTS}: the run was saved without EMA")
            self.ema.load_state_dict(load_file(str(path / EMA_WEIGHTS), device=str(acc.device)))
        record = load_json_file(path / TRAINER_STATE)
        try:
            self.state = TrainState(**record)
        except TypeError as e:
            raise CheckpointError(f"{path / TRAINER_STATE} is not a trainer state ({e})") from None

    # -- the folder itself ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def holding_run_folder(self):
        """Hold the run folder's lock for the block (:func:`~casify.train.run_lock.run_folder_lock`, taken by the
        main process); every process raises :class:`RunFolderError` when the folder cannot be used or another run
        holds it. On taking the lock, what a killed run left half-written is deleted. Re-entrant."""
        acc = self.accelerator
        with contextlib.ExitStack() as stack:
            error = None
            if acc.is_main_process:
                try:
                    self._make_output_dir()
                    if stack.enter_context(run_folder_lock(self.output_dir)):
                        self._remove_leftovers()
                except RunFolderError as e:
                    error = e
            if acc.num_processes > 1:  # the other processes learn the main process's outcome (a collective)
                from accelerate.utils import broadcast_object_list
                message = broadcast_object_list([None if error is None else str(error)])[0]
                if message is not None and error is None:
                    error = RunFolderError(message)
            if error is not None:
                raise error
            yield

    def _make_output_dir(self) -> None:
        out = self.output_dir
        with writing(out, "the run folder"):
            if out.exists() and not out.is_dir():
                raise RunFolderError(f"output_dir {out} is a file, not a folder: choose another output_dir, or move "
                                     "the file away")
            out.mkdir(parents=True, exist_ok=True)

    def _remove_leftovers(self) -> None:
        """Delete what a killed run leaves half-written: temporary files of atomic writes (``.<name>.casify-tmp-*``,
        and ``.<name>.<8 characters>`` of older casify versions beside a ``<name>``), a checkpoint being written
        (``checkpoints/.tmp-step-*``) or being replaced (``checkpoints/step-*.old``). Only under the lock: another
        live run's temporary files are never touched."""
        folders = [self.output_dir] + sorted(p for p in self.output_dir.iterdir() if p.is_dir() and not p.is_symlink())
        for folder in folders:
            for path in list(folder.iterdir()):
                older = OLDER_TEMP.fullmatch(path.name)
                if path.is_symlink():
                    continue
                if path.is_file() and (TEMP_MARK in path.name or older and (folder / older.group(1)).is_file()):
                    path.unlink(missing_ok=True)
                elif path.is_dir() and folder == self.checkpoint_root and (
                        path.name.startswith(".tmp-step-") or path.name.endswith(".old")):
                    shutil.rmtree(path, ignore_errors=True)

    # -- training -------------------------------------------------------------------------------------------------
    def _write_run_config(self) -> None:
        if self.accelerator.is_main_process:
            record = {"identity": self.identity, "train": self.config.to_dict(), "loss": self.loss.config(),
                      "attack": self.attack.to_dict() if self.attack else None,
                      "val_attack": self.val_attack.to_dict(), "num_processes": self.accelerator.num_processes,
                      "global_batch_size": self.global_batch_size,
                      "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                      "code": code_version(), "code_history": self._code_history()}
            text = json.dumps(record, indent=1, default=str)
            with writing(self.output_dir / RUN_RECORD, "the run record"):
                atomic_write(self.output_dir / RUN_RECORD, lambda tmp: Path(tmp).write_text(text))

    def _code_history(self) -> list:
        """Every code version that trained this run, oldest first: a resume under another commit adds one, so a
        study can refuse to judge a run that two code versions trained."""
        history = []
        path = self.output_dir / RUN_RECORD
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                old = None
            if isinstance(old, dict) and old.get("identity") == json.loads(json.dumps(self.identity, default=str)):
                history = old.get("code_history") or ([old["code"]] if isinstance(old.get("code"), dict) else [])
        now = code_version()
        return history if history and history[-1] == now else history + [now]

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
            diff = record_differences(current_names(old), self.identity)
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
                code=code_version(), overfitting=self.state.overfitting)
            with writing(folder, f"the {name} model"):
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

    def __init__(self, model: DefendedModel, state: Dict[str, torch.Tensor]):
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
        from ..io.serialization import save_pretrained
        return save_pretrained(self, save_directory, **kwargs)
