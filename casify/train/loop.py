"""The training loop: each step crafts the adversarial batch in eval mode (the attack routes by prediction), then
updates in training mode (the loss routes by the label); validation selects the checkpoint on the held-out split."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import attacks, losses
from ..attacks.constants import SINGLE_STEP_ATTACKS
from ..defenses import routed_modules
from ..data import EpochSeededDataset
from ..data.data_fit import check_data_fits
from ..model.defended import DefendedModel
from ..core.routing import route
from ..model.surgery import wrap
from .trackers import flat_config
from .checkpoints import RunFolder, checkpoint_step, model_fingerprint
from .config import TrainConfig, TrainState
from .metrics import MetricWindow, grouped_tags
from .overfit_guard import MASKING_GAP, collapse_record, describe, fgsm_check_attack
from .schedule import lr_scheduler


def freeze_batch_norm_statistics(model: nn.Module) -> int:
    """Put every batch-norm layer (torch's and timm's norm-act layers, which subclass them) in eval mode: it
    normalises with its running statistics and stops updating them; its affine weights still get gradients
    (``TrainConfig.freeze_bn_stats``). Returns how many layers it froze."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            frozen += 1
    return frozen


def model_channels(model: nn.Module) -> Optional[int]:
    """The number of image channels ``model`` takes: its recorded input size, else its first convolution's."""
    size = (getattr(model, "casify_config", None) or {}).get("cas", {}).get("input_size") \
        if isinstance(getattr(model, "casify_config", None), dict) else None
    if size:
        return int(size[0])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else None


def check_channels(model: nn.Module, data: Dataset) -> None:
    """Grayscale images into an RGB model (or the reverse) fail deep in the first convolution, after the run folder
    is set up: say it before, in one line."""
    expected = model_channels(model)
    image = data[0][0] if len(data) else None
    if expected is None or not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] == expected:
        return
    have = "grayscale images (1 channel)" if image.shape[0] == 1 else f"images with {image.shape[0]} channels"
    want = "RGB images (3 channels)" if expected == 3 else f"images with {expected} channel(s)"
    raise ValueError(f"the training data holds {have}, shape {tuple(image.shape)}, but the model takes {want}: "
                     + ("convert the images to RGB (repeat the gray channel) or build the model for 1 channel (e.g. "
                        "model.kwargs: {in_chans: 1} for timm)" if image.shape[0] == 1 and expected == 3 else
                        "give the model images with the channels it was built for"))


class Trainer(RunFolder):
    """Adversarial fine-tuning of a (usually CAS-wrapped) model.

    Args:
        model: the model to train; inputs are pixels in [0, 1].
        train_set / val_set: datasets of (image, label). ``val_set`` is the held-out split for checkpoint selection.
        config: a :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator``; by default one is made from the config.
        callbacks: functions ``fn(trainer)`` called after every optimizer step (logging, or stopping a run in tests).
        identity: what else identifies the run beyond ``config`` and the model's architecture (the recipes pass the
            model and data settings); recorded in ``run_config.json`` and compared on resume.

    Augmentation randomness is drawn per item from (seed, epoch, index) (:class:`casify.data.EpochSeededDataset`), so
    a run is reproducible and resumes bit-exactly whatever ``num_workers`` is.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Optional[Dataset], config: TrainConfig,
                 accelerator=None, callbacks: Sequence[Callable] = (), identity: Optional[dict] = None):
        # Each job in its own method, in this order on purpose: the seed is set before anything draws random numbers,
        # and the model and data are checked before the loaders and Accelerate's prepare touch them.
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = self._make_accelerator(accelerator)
        self._seed_and_make_loss()
        self._check_inputs(model, train_set, val_set)
        fingerprint = model_fingerprint(model)  # of the model as given, so runs of plain models still resume
        if not isinstance(model, DefendedModel):  # a wrapped model without CAS: saved and loaded like every casify model
            model = wrap(model, [], normalize=None, input_size=tuple(train_set[0][0].shape))
        self._make_attacks()
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.stop = False
        self.identity = {"train": config.identity(), "model": fingerprint,
                         "data": {"train_size": len(train_set), "val_size": len(val_set) if val_set is not None else 0},
                         **json.loads(json.dumps(identity or {}, default=str))}
        train_loader = self._make_loaders(train_set, val_set)
        self._prepare(model, train_loader)
        self._plan_steps()

    def _make_accelerator(self, accelerator):
        """The given ``accelerate.Accelerator``, else one made from the config; refused under FSDP1."""
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        config = self.config
        # Launched as several processes on a machine without GPUs (`accelerate launch --multi_gpu` or torchrun on a
        # CPU box), Accelerate runs them as MULTI_CPU (gloo) only when told cpu=True.
        cpu_only = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        accelerator = accelerator or Accelerator(
            cpu=cpu_only, mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
            log_with=config.log_with,
            # non_blocking: host -> GPU copies of the (pinned) batches overlap the previous step
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")))
        self.accelerator = accelerator  # _sharded reads it
        if self._sharded and not accelerator.is_fsdp2:
            # FSDP1 flattens the parameters of the module it wraps, so the unwrapped model the attacks and validation
            # run would see flat shards; FSDP2 (fully_shard) shards in place and runs any forward of the module.
            raise ValueError("casify trains under FSDP2 only: set fsdp_version: 2 in the accelerate config "
                             "(accelerate launch --use_fsdp --fsdp_version 2)")
        return accelerator

    def _seed_and_make_loss(self) -> None:
        from accelerate.utils import set_seed

        config = self.config
        set_seed(config.seed)
        if config.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self.loss = losses.get_loss(config.method, cas=config.cas, beta=config.beta, defaults=config.defaults,
                                    **config.loss_kwargs)

    def _check_inputs(self, model: nn.Module, train_set: Dataset, val_set: Optional[Dataset]) -> None:
        """Refuse a model and data that cannot train together, in one line, before any folder or device work."""
        config = self.config
        if config.cas and not isinstance(model, DefendedModel):
            raise ValueError("config.cas=True needs a CAS-wrapped model (casify.wrap); use cas=False for plain "
                             f"{config.method.upper()}")
        check_channels(model, train_set)
        # the CLI's guards, here too: no examples, 0..255 / uint8 / NaN images, another class count or image size
        check_data_fits(model, train_set, "the training set")
        if val_set is not None and len(val_set) > 0:
            check_data_fits(model, val_set, "the validation set")

    def _make_attacks(self) -> None:
        """The training attack (none for natural training), the held-out PGD and the overfitting guard's FGSM."""
        config = self.config
        self.attack = self.loss.training_attack(config.attack, eps=config.eps, steps=config.attack_steps,
                                                **({"alpha": config.attack_alpha} if config.attack_alpha else {}))
        self.val_attack = attacks.Attack(name="val-pgd", eps=config.eps, steps=config.val_attack_steps,
                                         objective="cas" if config.cas else "ce", beta=config.beta)
        # the catastrophic-overfitting guard's single-step check, beside PGD on the same held-out batches
        self.guard_attack = (fgsm_check_attack(config.eps, self.val_attack.objective, config.beta)
                             if self.attack is not None else None)

    def _make_loaders(self, train_set: Dataset, val_set: Optional[Dataset]) -> DataLoader:
        """The training loader (returned; augmentation seeded per item) and ``self.val_loader`` (None without a
        held-out split), both not yet prepared."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        self.train_data = EpochSeededDataset(train_set, config.seed)
        train_loader = DataLoader(self.train_data, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                  num_workers=config.num_workers, generator=generator,
                                  pin_memory=torch.cuda.is_available())  # not persistent: set_epoch must reach workers
        self.val_loader = None
        if val_set is not None and len(val_set) > 0:
            if config.val_max_examples and len(val_set) > config.val_max_examples:
                val_set = torch.utils.data.Subset(val_set, range(config.val_max_examples))
            self.val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                                         pin_memory=torch.cuda.is_available())
        return train_loader

    def _prepare(self, model: nn.Module, train_loader: DataLoader) -> None:
        """The optimizer, then the model, optimizer and loaders through Accelerate; the compiled callables and the
        EMA of the weights after that (they follow the prepared model onto its device)."""
        from timm.optim import param_groups_weight_decay

        config = self.config
        # timm's grouping: no weight decay on biases and norm parameters (every parameter with ndim <= 1)
        optimizer = torch.optim.SGD(param_groups_weight_decay(model, config.weight_decay), lr=config.lr,
                                    momentum=config.momentum)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        prepared = self.accelerator.prepare(model, optimizer, train_loader,
                                            *([self.val_loader] if self.val_loader is not None else []))
        self.model, self.optimizer, self.train_loader = prepared[:3]
        self.unwrapped = self.accelerator.unwrap_model(self.model)  # without DDP / FSDP containers
        # What each phase runs: compiled once here when asked (the attack's eval-mode graph and the update's
        # train-mode graph are separate compiled callables, so neither evicts the other), plain modules otherwise.
        self.update_model: nn.Module = self._compiled(self.model)
        self.attack_model: nn.Module = self._compiled(self.unwrapped)
        self._compiled_eval: Dict[int, nn.Module] = {}
        self.ema = None
        if config.ema_decay is not None and self._sharded:
            raise ValueError("train.ema_decay is not supported under FSDP: the average is a full copy of the model "
                             "(timm's ModelEmaV3 deep-copies it, and FSDP modules refuse deepcopy); train without "
                             "EMA, or use DDP (accelerate launch --multi_gpu) for EMA runs")
        if config.ema_decay is not None:  # after prepare: the average lives on the training device
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.unwrapped, decay=config.ema_decay)
        if self.val_loader is not None:
            self.val_loader = prepared[3]

    def _plan_steps(self) -> None:
        """Steps per epoch and in all (refused when an epoch holds no optimizer step), the global batch, the
        learning-rate schedule."""
        config = self.config
        self.steps_per_epoch = len(self.train_loader) // config.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set gives {len(self.train_loader)} batches of {config.batch_size} per "
                             f"process, fewer than grad_accum={config.grad_accum}; lower batch_size")
        total = int(math.ceil(config.epochs * self.steps_per_epoch))
        self.total_steps = min(total, config.max_steps) if config.max_steps is not None else total
        self.identity["train"]["num_processes"] = self.accelerator.num_processes
        self.global_batch_size = config.batch_size * self.accelerator.num_processes * config.grad_accum
        # Not through accelerator.prepare: its AcceleratedScheduler steps num_processes times per call and holds back
        # on steps the fp16 scaler skipped, whereas the rate here follows the optimizer step count.
        self.scheduler = lr_scheduler(self.optimizer.optimizer, config, self.steps_per_epoch, self.total_steps)
        # Not registered with accelerator.register_for_checkpointing either: Accelerate would unpickle its state in
        # full (weights_only off) on resume. The run folder saves and loads it as data (casify.train.checkpoint_files).

    # -- evaluation -----------------------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated, selected and saved: the EMA of the weights when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def _compiled(self, module: nn.Module) -> nn.Module:
        if not self.config.compile:
            return module
        return torch.compile(module, backend=self.config.compile_backend, mode=self.config.compile_mode)

    def _to_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last and x.dim() == 4 else x

    def validate(self) -> Dict[str, float]:
        """Natural and PGD accuracy on the held-out split, gathered over processes (of the EMA weights when kept);
        with a training attack also FGSM accuracy (``val_fgsm``), for the catastrophic-overfitting guard."""
        base = self.eval_model
        if self.ema is None:
            model = self.attack_model
        else:  # the EMA copy is compiled once too
            model = self._compiled_eval.setdefault(id(base), self._compiled(base))
        was_training = base.training
        model.eval()
        correct_nat = correct_adv = correct_fgsm = torch.zeros((), dtype=torch.long)
        count = 0
        for i, (x, y) in enumerate(self.val_loader):
            x = self._to_format(x)
            with self.accelerator.autocast():
                x_adv = self.val_attack(model, x, y)
                x_fgsm = self.guard_attack(model, x, y) if self.guard_attack is not None else None
                # the routing the attack ran with (predicted, explicitly), so the scoring reuses one compiled graph
                routed = route(model, labels=None) if routed_modules(model) else contextlib.nullcontext()
                if i == 0 and isinstance(base, DefendedModel):
                    # a new data source: on a GPU its first clean batch is range-checked too (the attack's first
                    # forward, which the check would otherwise read, sees an iterate clipped to [0, 1])
                    base.recheck_input_range()
                with torch.no_grad(), routed:
                    nat = attacks.predicted_correctly(model(x), y)  # NaN / inf logits: never correct
                    adv = attacks.predicted_correctly(model(x_adv), y)
                    fgsm = attacks.predicted_correctly(model(x_fgsm), y) if x_fgsm is not None else adv
            nat, adv, fgsm = self.accelerator.gather_for_metrics((nat, adv, fgsm))
            correct_nat = correct_nat.to(nat.device) + nat.sum()  # read back once, after the loop
            correct_adv = correct_adv.to(adv.device) + adv.sum()
            correct_fgsm = correct_fgsm.to(fgsm.device) + fgsm.sum()
            count += nat.numel()
        base.train(was_training)
        metrics = {"val_natural": int(correct_nat) / max(1, count), "val_pgd": int(correct_adv) / max(1, count),
                   "val_count": count}
        if self.guard_attack is not None:
            metrics["val_fgsm"] = int(correct_fgsm) / max(1, count)
        return metrics

    # -- training -------------------------------------------------------------------------------------------------
    def train(self, resume: bool = True, overwrite: bool = False) -> TrainState:
        """Run to ``total_steps``.

        ``resume``: continue from the latest checkpoint in ``output_dir`` if that folder holds this same run (same
        record in ``run_config.json``), and refuse with :class:`RunMismatchError` if it holds another. ``resume=False``
        refuses a folder that holds a run unless ``overwrite=True``, which deletes that run first. Resuming reads
        the newest intact checkpoint (checked against its SHA-256 manifest; a fallback to an older one is warned
        about) and refuses when none is. The folder is locked for the run: a second process is refused.
        """
        with self.holding_run_folder():
            return self._train(resume, overwrite)

    def _train(self, resume: bool, overwrite: bool) -> TrainState:
        self._open_run(resume, overwrite)
        bar = self._progress_bar()
        while self.state.global_step < self.total_steps and not self.stop:
            self._run_epoch(bar)
        bar.close()
        self._close_run()
        return self.state

    def _open_run(self, resume: bool, overwrite: bool) -> None:
        """Claim the output folder (refusing another run's), record this run, restore its newest checkpoint when
        resuming, say where the run stands and start the trackers."""
        acc, cfg = self.accelerator, self.config
        self._check_output_dir(resume, overwrite)
        self._write_run_config()
        latest = self.resume_checkpoint() if resume else None
        if latest is not None:
            self.load_checkpoint(latest)
        self._say_if_finished(resume, latest)
        if acc.is_main_process and cfg.progress:
            print(f"casify: global batch {self.global_batch_size} = batch_size {cfg.batch_size} per process x "
                  f"{acc.num_processes} process(es) x grad_accum {cfg.grad_accum}; {self.steps_per_epoch} steps per "
                  f"epoch, {self.total_steps} in all" + (f", resuming at step {self.state.global_step}" if latest else ""))
        if cfg.log_with:
            acc.init_trackers("casify", config=flat_config(cfg.to_dict()))

    def _progress_bar(self):
        """A bar on a terminal; in a log file one line per log_every_steps (casify.io.progress)."""
        from ..io.progress import progress_bar

        cfg = self.config
        return progress_bar(total=self.total_steps, initial=self.state.global_step,
                            disable=not (cfg.progress and self.accelerator.is_local_main_process),
                            desc=f"{cfg.method}{'+cas' if cfg.cas else ''}", every=cfg.log_every_steps,
                            dynamic_ncols=True)

    def _run_epoch(self, bar) -> None:
        """Train on the rest of the current epoch (after a resume, the batches it already trained on are skipped);
        return at the epoch's end, at the last step, or when a callback stopped the run."""
        cfg = self.config
        self.train_loader.set_epoch(self.state.epoch)
        self.train_data.set_epoch(self.state.epoch)  # Accelerate skips the dataset when the sampler has set_epoch
        loader = self.train_loader
        skip = self.state.step_in_epoch * cfg.grad_accum
        if skip:
            loader = self.accelerator.skip_first_batches(self.train_loader, skip)
        micro = 0
        window = MetricWindow()
        for x, y in loader:
            lr = self.scheduler.get_last_lr()[0]
            loss, metrics = self._micro_step(x, y)
            window.add({**metrics, "loss": loss})
            micro += 1
            if micro % cfg.grad_accum:
                continue
            if self._after_optimizer_step(window, lr, bar):
                return

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor):
        """One batch: the adversarial examples crafted in eval mode, then the loss's backward in training mode (the
        optimizer steps on the last micro-batch of an accumulation)."""
        acc = self.accelerator
        x = self._to_format(x)
        x_adv = x
        if self.attack is not None:  # eval mode, predicted routing: the attack sets both, restores the mode
            with acc.autocast():
                x_adv = self._training_attack_now()(self.attack_model, x, y)
        self.model.train()
        if self.config.freeze_bn_stats:
            freeze_batch_norm_statistics(self.model)
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, metrics = self.loss(self.update_model, x, x_adv, y)
            acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, metrics

    def _training_attack_now(self) -> attacks.Attack:
        """The training attack at this optimizer step: during ``eps_warmup_steps`` its radius (and step) is the
        fraction ``(step + 1) / eps_warmup_steps`` of the full one; a function of the step alone, so a resumed run
        crafts what the uninterrupted one would."""
        warmup = self.config.eps_warmup_steps
        if not warmup or self.state.global_step >= warmup:
            return self.attack
        scale = (self.state.global_step + 1) / warmup
        # Attack resolves its step when built (the kind's own default, proportional to eps, or the one set)
        return dataclasses.replace(self.attack, eps=self.attack.eps * scale, alpha=self.attack.alpha * scale)

    def _after_optimizer_step(self, window: MetricWindow, lr: float, bar) -> bool:
        """Advance the EMA, the rate and the step count; when due, log, validate and select, checkpoint; call the
        callbacks. True when this pass over the epoch ends (its end, the last step, or a stop)."""
        cfg = self.config
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=self.state.global_step)
        self.scheduler.step()
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        bar.update(1)
        end_of_epoch = self.state.step_in_epoch >= self.steps_per_epoch
        last = self.state.global_step >= self.total_steps
        validating = self.val_loader is not None and (
            last or (cfg.val_every_steps and self.state.global_step % cfg.val_every_steps == 0)
            or (not cfg.val_every_steps and end_of_epoch))
        if validating or end_of_epoch or last or self.state.global_step % cfg.log_every_steps == 0:
            # the means since the last log, read back here only: every other step queues and moves on
            logged = self._log(window, lr, bar)
        if end_of_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
        if validating:
            self._validate_and_select(logged)
        if self._checkpoint_due(end_of_epoch, last):
            self.save_checkpoint()
        for callback in self.callbacks:
            callback(self)
        if last or self.stop or end_of_epoch:
            if self.stop and window.count:  # stopped between two logs: log the steps since the last
                self._log(window, lr, bar)
            return True
        return False

    def _close_run(self) -> None:
        """The final model when the run reached total_steps; when a callback stopped it early, a checkpoint to resume
        from (never a "final" model). Then the trackers end."""
        if self.state.global_step >= self.total_steps:
            self._save_model("final")
        elif self.state.global_step and (self.latest_checkpoint() is None or
                                         checkpoint_step(self.latest_checkpoint()) != self.state.global_step):
            self.save_checkpoint()
        if self.config.log_with:
            self.accelerator.end_training()

    def _log(self, window: "MetricWindow", lr: float, bar) -> dict:
        logged = {**window.flush(self.accelerator), "lr": lr, "step": self.state.global_step, "epoch": self.state.epoch}
        bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{lr:.3g}")
        if self.config.log_with:
            self.accelerator.log(grouped_tags(logged, "train"), step=self.state.global_step)
        return logged

    def _validate_and_select(self, logged: dict) -> None:
        metrics = self.validate()
        # "loss": the mean training loss over the steps since the previous log (train.log_every_steps)
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": logged.get("loss"), **metrics}
        collapse = collapse_record(self.state.history, record) if self.attack is not None else None
        self.state.history.append(record)
        if self.config.log_with:
            self.accelerator.log(grouped_tags(metrics, "val"), step=self.state.global_step)
        if collapse is not None and self.state.overfitting is None:  # the first collapse: warned about once
            self._record_collapse(collapse)
        # Adversarial training selects by robust accuracy; natural training (no attack) by natural accuracy. After a
        # collapse the guard keeps the checkpoint selected before it (train.overfit_guard).
        metric = metrics["val_pgd"] if self.attack is not None else metrics["val_natural"]
        protected = self.state.overfitting is not None and self.config.overfit_guard
        if metric > self.state.best_metric and not protected:
            self.state.best_metric = metric
            self.state.best_step = self.state.global_step
            self._save_model("best", metrics)


    def _record_collapse(self, collapse: dict) -> None:
        """Record the first catastrophic overfitting in the run's state and in the selected model's training record,
        and warn (once: the record is in the state, which a resumed run restores)."""
        if self.config.overfit_guard and self.state.best_step >= 0:
            collapse["selection"] = (f"best/ stays the checkpoint of step {self.state.best_step}, selected before the "
                                     "collapse (train.overfit_guard)")
            own = collapse.get("best_fgsm_minus_pgd")
            if own is not None and own > MASKING_GAP:  # the fallback itself was masked: say so, do not vouch for it
                collapse["selection"] += (f", though its own FGSM accuracy was already {own:.0%} above its PGD "
                                          "accuracy")
        elif self.config.overfit_guard:
            collapse["selection"] = "no checkpoint was selected before the collapse"
        else:
            collapse["selection"] = "train.overfit_guard is off: selection goes on by held-out PGD accuracy"
        self.state.overfitting = collapse
        if self.accelerator.is_main_process:
            if self.config.attack in SINGLE_STEP_ATTACKS:
                advice = ("Single-step training overfitted; N-FGSM (train.attack: n_fgsm), a smaller eps or PGD "
                          "(train.attack: pgd) avoid it")
            else:
                advice = (f"Training with {self.config.attack} shows gradient masking; check the model with stronger "
                          "and black-box attacks (casify eval) before trusting its robust accuracy")
            warnings.warn(f"casify: {describe(collapse)}. {advice}", stacklevel=3)
        self._note_overfitting_in_saved_model("best")


def train(model: nn.Module, train_set: Dataset, val_set: Optional[Dataset], config: TrainConfig, **kwargs) -> Trainer:
    """Build a :class:`Trainer`, run it (resuming from ``config.output_dir`` when a checkpoint is there), return it."""
    trainer = Trainer(model, train_set, val_set, config, **kwargs)
    trainer.train()
    return trainer
