"""The Trainer on the libraries' plumbing: torch's schedulers give the learning rates of casify's schedule, their
state resumes with the run, and every saved model (with or without CAS) is a ``save_pretrained`` folder."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import casify
from casify.train import TrainConfig, Trainer, TrainingRecord, lr_scheduler


def reference_lr(config, step, steps_per_epoch, total_steps):
    """The schedule as a pure function of the step (casify's formula before torch's schedulers)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))
    epoch = step / max(1, steps_per_epoch)
    return config.lr * config.gamma ** sum(epoch >= m for m in config.milestones)


def _rates(config, steps_per_epoch, total_steps):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(2))], lr=config.lr)
    scheduler = lr_scheduler(optimizer, config, steps_per_epoch, total_steps)
    rates = []
    for _ in range(total_steps):
        assert len({g["lr"] for g in optimizer.param_groups}) == 1
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


# (settings, whether torch gives the formula's rates bit for bit after warmup)
CASES = [(dict(schedule="multistep", milestones=(75, 90), gamma=0.1, lr=0.1), True),  # the paper's (CIFAR recipes)
         (dict(schedule="multistep", milestones=(0.3, 1.5, 1.5, 2), gamma=0.2, lr=0.05), False),
         (dict(schedule="multistep", milestones=(0, 3), gamma=0.5, lr=0.3), True),
         (dict(schedule="cosine", lr=0.1), True), (dict(schedule="cosine", lr=0.0123), True),
         (dict(schedule="constant", lr=0.02), True)]


@pytest.mark.parametrize("warmup", [0, 1, 7, 40])
@pytest.mark.parametrize("case,exact", CASES, ids=lambda c: f"{c['schedule']}-{c['lr']}" if isinstance(c, dict) else "")
@pytest.mark.parametrize("steps_per_epoch,epochs", [(10, 100), (7, 3), (391, 2.5)])
def test_torch_schedulers_give_the_rates_of_the_formula(case, exact, warmup, steps_per_epoch, epochs):
    config = TrainConfig(warmup_steps=warmup, epochs=epochs, **case)
    total = int(math.ceil(epochs * steps_per_epoch))
    rates = _rates(config, steps_per_epoch, total)
    expected = [reference_lr(config, s, steps_per_epoch, total) for s in range(total)]
    # Up to float rounding everywhere: LinearLR (warmup) and MultiStepLR update the rate by multiplying the last one,
    # which can round differently from the formula's single product (a few ulps) ...
    assert rates == pytest.approx(expected, rel=1e-14, abs=0)
    if exact:  # ... and bit for bit after warmup for one decay per milestone and for cosine and constant
        assert rates[warmup:] == expected[warmup:]


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _plain_net():
    torch.manual_seed(0)  # fixed input size: the Trainer wraps it with the data's image size, not a 224 dummy
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def _config(path, **kw):
    base = dict(method="at", cas=False, epochs=2, batch_size=8, lr=0.05, eps=4 / 255, attack_steps=1,
                output_dir=str(path), progress=False, val_max_examples=16, schedule="cosine", warmup_steps=3)
    base.update(kw)
    return TrainConfig(**base)


class Crash(RuntimeError):
    pass


def test_the_scheduler_resumes_with_the_run(tmp_path, one_thread):
    rates = {"a": [], "b": []}
    reference = Trainer(_plain_net(), _data(), None, _config(tmp_path / "a"),
                        callbacks=[lambda t: rates["a"].append(t.optimizer.param_groups[0]["lr"])])
    reference.train(resume=False)

    def crash_after_step_4(trainer):  # inside warmup's end and cosine's start: 6 steps per epoch, warmup 3
        rates["b"].append(trainer.optimizer.param_groups[0]["lr"])
        if trainer.state.global_step == 4:
            raise Crash()

    with pytest.raises(Crash):
        Trainer(_plain_net(), _data(), None, _config(tmp_path / "b", checkpoint_every_steps=2),
                callbacks=[crash_after_step_4]).train()
    assert (tmp_path / "b" / "checkpoints" / "step-00000004" / "scheduler.bin").exists()
    resumed = Trainer(_plain_net(), _data(), None, _config(tmp_path / "b", checkpoint_every_steps=2),
                      callbacks=[lambda t: rates["b"].append(t.optimizer.param_groups[0]["lr"])])
    assert resumed.scheduler.last_epoch == 0
    resumed.train()
    assert resumed.scheduler.last_epoch == 12 and rates["a"] == rates["b"] and len(rates["a"]) == 12
    for (k, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_plain_model_is_saved_and_loaded_like_every_casify_model(tmp_path, one_thread):
    net = _plain_net()
    trainer = Trainer(net, _data(), _data(16, 1), _config(tmp_path, epochs=1))
    assert isinstance(trainer.unwrapped, casify.DefendedModel) and not casify.find_cas_modules(trainer.unwrapped)
    assert trainer.identity["model"]["class"] == "Sequential"  # the run is named by the model it was given
    trainer.train(resume=False)
    for name in ("best", "final"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert list(config["training"]) == ["config", "loss", "attack", "selected_on", "step", "weights", "code"]
    assert set(config["training"]["code"]) == {"casify_version", "commit", "dirty"}
    assert config["training"]["step"] == 6 and config["training"]["selected_on"] == "last step"
    loaded = casify.from_pretrained(tmp_path / "final", model=_plain_net())
    for k, v in trainer.unwrapped.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    x = _data(4, 2).tensors[0]
    torch.testing.assert_close(loaded.eval()(x), trainer.unwrapped.eval()(x), rtol=0, atol=0)
    from casify.io.model_card import make_model_card
    card = make_model_card(config, "plain")
    assert "fine-tuned with AT" in str(card)


def test_training_record_keeps_the_keys_the_model_card_reads():
    record = TrainingRecord(config={"method": "at", "cas": True}, loss={"method": "at"}, attack=None,
                            selected_on="last step", step=3, weights="trained")
    assert record.to_dict() == {"config": {"method": "at", "cas": True}, "loss": {"method": "at"}, "attack": None,
                                "selected_on": "last step", "step": 3, "weights": "trained"}


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_batch_norm_statistics_stay_and_normalise_the_update_too(tmp_path, one_thread, freeze):
    """freeze_bn_stats: the update normalises with the running statistics (the function the attack saw) and
    leaves them as they were; the affine weights still learn. Without it the statistics follow the batches."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 5))
    bn = net[1]
    with torch.no_grad():  # running statistics far from the data's, as a pretrained network's on new data
        bn.running_mean.fill_(-0.5)
        bn.running_var.fill_(4.0)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    trainer = Trainer(net, _data(), _data(16, seed=1), _config(tmp_path, epochs=1, freeze_bn_stats=freeze))
    trainer.train()
    after = bn.state_dict()
    stats_kept = all(torch.equal(before[k], after[k]) for k in ("running_mean", "running_var"))
    assert stats_kept is freeze
    assert not torch.equal(before["weight"], after["weight"])  # the affine weights train either way
    assert trainer.config.identity().get("freeze_bn_stats", False) is freeze  # part of the run's identity when on
