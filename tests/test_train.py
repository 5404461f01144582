"""The training loop: routing per phase, exact resume after a crash, selection on the held-out split."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import casify
from casify.train import TrainConfig, Trainer


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return TensorDataset(x, y)


def _model():
    from conftest import TinyNet
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), layers=["stem", "block"], input_size=(3, 8, 8), normalize=None, init="paper")


def _config(tmp_path, **kw):
    base = dict(method="at", cas=True, epochs=2, batch_size=8, lr=0.05, eps=4 / 255, attack_steps=2,
                output_dir=str(tmp_path), progress=False, val_max_examples=16, milestones=(1,))
    base.update(kw)
    return TrainConfig(**base)


def test_attack_in_eval_with_predicted_routing_update_in_train_with_labels(tmp_path):
    model = _model()
    calls = []
    module = casify.find_cas_modules(model)[0]
    module.register_forward_pre_hook(lambda m, inp: calls.append((m.training, None if m._route is None else m._route[0])))
    trainer = Trainer(model, _data(16), None, _config(tmp_path, method="at", attack_steps=3, max_steps=1))
    trainer.train(resume=False)
    # 3 attack steps in eval mode with predicted routing, then one training forward routed by the labels
    assert calls == [(False, "predicted")] * 3 + [(True, "labels")]


def test_trades_routes_both_training_forwards_by_labels(tmp_path):
    model = _model()
    calls = []
    casify.find_cas_modules(model)[0].register_forward_pre_hook(
        lambda m, inp: calls.append((m.training, None if m._route is None else m._route[0])))
    Trainer(model, _data(16), None, _config(tmp_path, method="trades", attack_steps=2, max_steps=1)).train(resume=False)
    assert calls[-2:] == [(True, "labels"), (True, "labels")]
    assert all(c == (False, "predicted") for c in calls[:-2])


class Crash(RuntimeError):
    pass


def test_kill_and_resume_ends_with_the_same_weights(tmp_path):
    config = dict(epochs=2, checkpoint_every_steps=2)  # 6 steps per epoch: the crash is mid-epoch
    reference = Trainer(_model(), _data(), _data(16, 1), _config(tmp_path / "a", **config))
    reference.train(resume=False)

    def crash_after_step_4(trainer):
        if trainer.state.global_step == 4:
            raise Crash()

    crashed = Trainer(_model(), _data(), _data(16, 1), _config(tmp_path / "b", **config), callbacks=[crash_after_step_4])
    with pytest.raises(Crash):
        crashed.train()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-00000004"
    torch.manual_seed(1234)  # a fresh process: the global RNG is wherever it is
    resumed = Trainer(_model(), _data(), _data(16, 1), _config(tmp_path / "b", **config))
    state = resumed.train()
    assert state.global_step == reference.state.global_step == 12
    for (k, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [h["val_pgd"] for h in state.history] == [h["val_pgd"] for h in reference.state.history]


def test_selection_uses_validation_and_saves_hub_ready_folders(tmp_path):
    trainer = Trainer(_model(), _data(), _data(16, 1), _config(tmp_path, epochs=2))
    state = trainer.train(resume=False)
    assert len(state.history) == 2 and state.best_step in (6, 12)
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["training"]["selected_on"].startswith("held-out validation")
    assert set(config["metrics"]) == {"val_natural", "val_pgd", "val_count", "val_fgsm"}  # FGSM: the CO guard
    run = json.loads((tmp_path / "run_config.json").read_text())
    assert run["loss"]["method"] == "at" and run["attack"]["objective"] == "cas"
    from conftest import TinyNet
    loaded = casify.from_pretrained(tmp_path / "final", model=TinyNet())
    trained = trainer.accelerator.unwrap_model(trainer.model)
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_bad_config_is_explained(tmp_path):
    with pytest.raises(ValueError, match="pixel units"):
        TrainConfig(eps=8)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step")
    with pytest.raises(TypeError, match="TrainConfig has no setting 'methd'; did you mean 'method'"):
        TrainConfig(methd="at")
    with pytest.raises(TypeError, match="no setting 'zzz'; the settings are: method, cas"):
        TrainConfig(zzz=1)
    from conftest import TinyNet
    with pytest.raises(ValueError, match="needs a CAS-wrapped model"):
        Trainer(TinyNet(), _data(), None, _config(tmp_path, cas=True))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Two accumulated half batches give the same update as one full batch (no BN in the way: standard loss, eval-free
    model state compared after one optimizer step)."""
    from torch import nn

    def linear_model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        return casify.wrap(net, [], input_size=(3, 8, 8), normalize=None)

    data = _data(16)
    full = Trainer(linear_model(), data, None, _config(tmp_path / "full", method="standard", cas=False, batch_size=16,
                                                       max_steps=1, momentum=0.0, weight_decay=0.0))
    full.train(resume=False)
    accum = Trainer(linear_model(), data, None, _config(tmp_path / "acc", method="standard", cas=False, batch_size=8,
                                                        grad_accum=2, max_steps=1, momentum=0.0, weight_decay=0.0))
    state = accum.train(resume=False)
    assert state.global_step == 1
    # same examples in both runs: the loader's seeded order is the same, split into two halves
    for a, b in zip(full.model.state_dict().values(), accum.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_natural_training_selects_on_natural_accuracy(tmp_path):
    trainer = Trainer(_model(), _data(), _data(16, 1), _config(tmp_path, method="standard", cas=True, epochs=3))
    state = trainer.train(resume=False)
    assert trainer.attack is None and len(state.history) == 3
    assert state.best_metric == max(h["val_natural"] for h in state.history)
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["training"]["selected_on"] == "held-out validation split (natural accuracy)"


def test_checkpoints_once_per_epoch_by_default_so_a_finished_run_is_not_retrained(tmp_path, capsys):
    steps = []
    config = _config(tmp_path, epochs=2, keep_checkpoints=5)
    assert config.checkpoint_every_steps is None
    trainer = Trainer(_model(), _data(), None, config)
    trainer.train()
    per_epoch = trainer.steps_per_epoch
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == [f"step-{per_epoch:08d}", f"step-{2 * per_epoch:08d}"]
    capsys.readouterr()
    Trainer(_model(), _data(), None, config, callbacks=[lambda t: steps.append(t.state.global_step)]).train()
    assert steps == [] and "finished (step" in capsys.readouterr().out


def test_rerunning_a_finished_run_without_checkpoints_says_so(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every_steps=0)
    Trainer(_model(), _data(), None, config).train()
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "final").is_dir()
    with pytest.warns(UserWarning, match="without a checkpoint to resume from.*trained again from step 0"):
        Trainer(_model(), _data(), None, config).train()
    with pytest.raises(ValueError, match="checkpoint_every_steps must be >= 0"):
        _config(tmp_path, checkpoint_every_steps=-1)
