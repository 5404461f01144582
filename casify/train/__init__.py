"""Adversarial fine-tuning on Accelerate: the same loop on one CPU and on many GPUs.

Each step crafts the adversarial batch with the model in eval mode and every routed defense module routed by its own
prediction (the attack does that), then updates in training mode with the modules routed by the true labels (the loss
does that). Checkpoints are written atomically and hold everything an exact resume needs: model, optimizer,
learning-rate scheduler, the RNG states and the position in the epoch.

One job per file (each imports only the ones above it):

- ``config.py``: :class:`TrainConfig` (what decides a run), :class:`TrainState`, :class:`TrainingRecord`;
- ``schedule.py``: :func:`lr_scheduler`;
- ``metrics.py``: the step metrics averaged on the device between logs;
- ``checkpoint_files.py``: a checkpoint's files read as data (SHA-256 manifest, RNG states as JSON + safetensors);
- ``run_lock.py``: one process per run folder (``filelock``);
- ``checkpoints.py``: the run folder (atomic checkpoints, the run record compared on resume, saved models);
- ``loop.py``: :class:`Trainer` and :func:`train`.
"""
from .checkpoints import model_fingerprint
from .checkpoint_files import CheckpointError
from .config import (EMA_WEIGHTS, METHODS, NOT_IDENTITY, RUN_RECORD, SCHEDULES, RunFolderError, RunMismatchError,
                     TrainConfig, TrainingRecord, TrainState)
from .run_lock import RunFolderLocked
from .loop import Trainer, train
from .schedule import lr_scheduler

__all__ = ["CheckpointError", "EMA_WEIGHTS", "METHODS", "NOT_IDENTITY", "RUN_RECORD", "SCHEDULES", "RunFolderError",
           "RunFolderLocked", "RunMismatchError", "TrainConfig",
           "TrainState", "Trainer", "TrainingRecord", "lr_scheduler", "model_fingerprint", "train"]
