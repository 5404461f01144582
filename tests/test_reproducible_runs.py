"""Runs reproduce and resume exactly, with augmentation on and with worker processes; a folder never silently holds
two runs."""
import json

import pytest
import torch

import casify
from casify.data import TensorImageDataset, cifar_train_transform
from casify.train import RunMismatchError, TrainConfig, Trainer


def _augmented_data(n=48, seed=0):
    """uint8 images with the paper's pad-crop-flip: every item draws randomness."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    y = torch.randint(0, 5, (n,), generator=g).numpy()
    return TensorImageDataset(x, y, transform=cifar_train_transform(8, padding=2))


def _model():
    from conftest import TinyNet
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), layers=["stem", "block"], input_size=(3, 8, 8), normalize=None, init="paper")


def _config(path, **kw):
    base = dict(method="at", cas=True, epochs=2, batch_size=8, lr=0.05, eps=4 / 255, attack_steps=2,
                output_dir=str(path), progress=False, val_max_examples=16, milestones=(1,), checkpoint_every_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("num_workers", [0, 2])
def test_crash_and_resume_with_augmentation_is_bit_exact(tmp_path, num_workers, one_thread):
    reference = Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "a", num_workers=num_workers))
    reference.train(resume=False)

    def crash_after_step_4(trainer):  # 6 steps per epoch: mid-epoch, after the checkpoint of step 4
        if trainer.state.global_step == 4:
            raise Crash()

    crashed = Trainer(_model(), _augmented_data(), _augmented_data(16, 1),
                      _config(tmp_path / "b", num_workers=num_workers), callbacks=[crash_after_step_4])
    with pytest.raises(Crash):
        crashed.train()
    torch.manual_seed(4321)  # a fresh process: the global RNG is wherever it is
    resumed = Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "b", num_workers=num_workers))
    assert resumed.train().global_step == 12
    _assert_same(_weights(reference), _weights(resumed))


def test_same_seed_same_weights_whatever_the_global_rng(tmp_path, one_thread):
    runs = []
    for i, junk_seed in enumerate((1, 99)):
        torch.manual_seed(junk_seed)
        torch.rand(int(junk_seed))  # the caller's RNG is in another state
        trainer = Trainer(_model(), _augmented_data(), None, _config(tmp_path / str(i), epochs=1, checkpoint_every_steps=None))
        trainer.train()
        runs.append(_weights(trainer))
    _assert_same(*runs)


def test_an_item_is_the_same_image_whatever_the_fetch_order():
    data = casify.data.EpochSeededDataset(_augmented_data(8), seed=3)
    data.set_epoch(1)
    first = [data[i][0] for i in range(8)]
    torch.rand(5)
    backwards = [data[i][0] for i in reversed(range(8))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    data.set_epoch(2)
    assert any(not torch.equal(a, data[i][0]) for i, a in enumerate(first))  # a new epoch draws new augmentations
    state = torch.get_rng_state()
    data[0]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG stream is untouched


def test_resuming_another_run_is_refused_with_what_differs(tmp_path, one_thread):
    Trainer(_model(), _augmented_data(), None, _config(tmp_path, epochs=1, max_steps=2)).train()
    with pytest.raises(RunMismatchError, match=r"train\.method: 'at' in the folder's run, 'trades' now"):
        Trainer(_model(), _augmented_data(), None, _config(tmp_path, epochs=1, max_steps=2, method="trades")).train()
    with pytest.raises(RunMismatchError, match=r"train\.lr"):
        Trainer(_model(), _augmented_data(), None, _config(tmp_path, epochs=1, max_steps=2, lr=0.2)).train()
    # the same run resumes (finished: no step left) and logging-only settings may change
    again = Trainer(_model(), _augmented_data(), None, _config(tmp_path, epochs=1, max_steps=2, keep_checkpoints=5))
    assert again.train().global_step == 2


def test_starting_afresh_needs_overwrite_and_leaves_nothing_of_the_old_run(tmp_path, one_thread):
    Trainer(_model(), _augmented_data(), None, _config(tmp_path, epochs=1, max_steps=4, checkpoint_every_steps=1)).train()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000004"
    fresh = _config(tmp_path, epochs=1, max_steps=2, checkpoint_every_steps=1, lr=0.01)
    with pytest.raises(RunMismatchError, match="overwrite=True"):
        Trainer(_model(), _augmented_data(), None, fresh).train(resume=False)
    Trainer(_model(), _augmented_data(), None, fresh).train(resume=False, overwrite=True)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-00000001", "step-00000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000002"
    record = json.loads((tmp_path / "run_config.json").read_text())
    assert record["identity"]["train"]["lr"] == 0.01


def test_rotation_orders_checkpoints_by_step(tmp_path, one_thread):
    trainer = Trainer(_model(), _augmented_data(), None, _config(tmp_path, epochs=1, checkpoint_every_steps=None))
    root = tmp_path / "checkpoints"
    for step in (9, 10, 100):  # by name, "step-100" sorts before "step-9"; checkpoint names are zero-padded anyway
        (root / f"step-{step}").mkdir(parents=True)
    trainer.state.global_step = 101
    trainer.save_checkpoint()
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000101", "step-100"]


def test_max_steps_zero_trains_nothing(tmp_path, one_thread):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, _augmented_data(), None, _config(tmp_path, max_steps=0))
    assert trainer.train().global_step == 0
    _assert_same(before, _weights(trainer))


def test_ema_is_validated_saved_and_resumed_exactly(tmp_path, one_thread):
    config = dict(ema_decay=0.9, epochs=2)
    reference = Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "a", **config))
    reference.train()

    def crash_after_step_4(trainer):
        if trainer.state.global_step == 4:
            raise Crash()

    with pytest.raises(Crash):
        Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "b", **config),
                callbacks=[crash_after_step_4]).train()
    resumed = Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "b", **config))
    resumed.train()
    _assert_same(reference.ema.state_dict(), resumed.ema.state_dict())
    from conftest import TinyNet
    final = casify.from_pretrained(tmp_path / "a" / "final", model=TinyNet())
    _assert_same(final.state_dict(), {k: v for k, v in reference.ema.module.state_dict().items()})
    raw = _weights(reference)
    assert not torch.equal(raw["stem.weight"], final.state_dict()["stem.weight"])  # the average, not the last step
    assert json.loads((tmp_path / "a" / "final" / "config.json").read_text())["training"]["weights"] == "EMA (decay 0.9)"


def test_plain_adversarial_training_without_cas_validates(tmp_path, one_thread):
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    plain = casify.wrap(net, [], input_size=(3, 8, 8), normalize=None)
    state = Trainer(plain, _augmented_data(), _augmented_data(16, 1), _config(tmp_path, cas=False, epochs=1)).train()
    assert state.history and 0 <= state.history[-1]["val_pgd"] <= 1


def test_a_stopped_run_leaves_a_checkpoint_not_a_final_model_and_resumes_exactly(tmp_path, one_thread):
    reference = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "a", checkpoint_every_steps=None))
    reference.train()

    def stop_after_step_5(trainer):  # what a time budget does: stop cleanly between steps
        if trainer.state.global_step == 5:
            trainer.stop = True

    stopped = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "b", checkpoint_every_steps=None),
                      callbacks=[stop_after_step_5])
    assert stopped.train().global_step == 5
    assert not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-00000005"
    resumed = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "b", checkpoint_every_steps=None))
    assert resumed.train().global_step == 12
    _assert_same(_weights(reference), _weights(resumed))


def test_eps_warmup_grows_the_training_attack_linearly_and_resumes_exactly(tmp_path, one_thread):
    """train.eps_warmup_steps: the training attack's radius (and a given step size) is (step + 1) / warmup of the
    full one, then the full one; validation attacks at the full eps; a crash mid-warm-up resumes bit-exactly."""
    seen = []
    reference = Trainer(_model(), _augmented_data(), _augmented_data(16, 1),
                        _config(tmp_path / "a", eps_warmup_steps=4, attack_alpha=2 / 255))
    original = reference._training_attack_now

    def spy():
        attack = original()
        seen.append((reference.state.global_step, attack.eps, attack.alpha))
        return attack

    reference._training_attack_now = spy
    reference.train(resume=False)
    first = {step: (eps, alpha) for step, eps, alpha in seen}
    for step in range(6):
        scale = min(1.0, (step + 1) / 4)
        assert first[step] == pytest.approx((4 / 255 * scale, 2 / 255 * scale))
    assert reference.val_attack.eps == pytest.approx(4 / 255) and reference.attack.eps == pytest.approx(4 / 255)

    def crash_after_step_3(trainer):  # inside the warm-up, after the checkpoint of step 2
        if trainer.state.global_step == 3:
            raise Crash()

    crashed = Trainer(_model(), _augmented_data(), _augmented_data(16, 1),
                      _config(tmp_path / "b", eps_warmup_steps=4, attack_alpha=2 / 255),
                      callbacks=[crash_after_step_3])
    with pytest.raises(Crash):
        crashed.train()
    resumed = Trainer(_model(), _augmented_data(), _augmented_data(16, 1),
                      _config(tmp_path / "b", eps_warmup_steps=4, attack_alpha=2 / 255))
    resumed.train()
    _assert_same(_weights(reference), _weights(resumed))
    plain = Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "c", attack_alpha=2 / 255))
    plain.train(resume=False)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(reference).values(), _weights(plain).values()))


def test_eps_warmup_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="eps_warmup_steps must be >= 0"):
        TrainConfig(eps_warmup_steps=-1)
    with pytest.raises(ValueError, match="natural training"):
        TrainConfig(method="standard", eps_warmup_steps=10)
