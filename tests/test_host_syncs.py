"""Host syncs in the hot loops (issue 12): an attack step and a training step must not make a GPU wait for the host.

Counted with casify.core.host_sync.HostSyncCounter on CPU. Reading a CPU tensor back is free, so casify's CPU-only fast
paths read values where it would wait on a GPU; ``as_on_a_gpu`` turns those off (casify.core.host_sync.SYNC_FREE_DEVICES
empty) so the CPU run takes the paths a GPU run takes.
"""
import tempfile

import pytest
import torch
from torch.utils.data import TensorDataset

import casify
import casify.core.host_sync
from casify.attacks import pgd
from casify.core.host_sync import HostSyncCounter
from casify.train import Trainer, TrainConfig

from conftest import SmallConvNet, separable_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    monkeypatch.setattr(casify.core.host_sync, "SYNC_FREE_DEVICES", ())


def cas_model():
    """With its input normalisation inside, so its forward runs the input-range check (a read-back on a GPU)."""
    torch.manual_seed(0)
    return casify.wrap(SmallConvNet(), ["relu2", "relu3"], normalize="imagenet", input_size=(3, 8, 8))


def test_the_counter_sees_every_kind_of_sync():
    t, mask = torch.randn(6), torch.tensor([True, False] * 3)
    with HostSyncCounter() as syncs:
        bool(mask.any())
        float(t.sum())
        t.nonzero()
        t[mask]
        torch.equal(t, t)
        torch.nn.functional.one_hot(torch.tensor([1, 2]), 4)  # range-checks its input on the host: min and max
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert dict(syncs.by_op) == {"aten._local_scalar_dense.default": 4, "aten.nonzero.default": 1,
                                 "aten.index.Tensor": 1, "aten.equal.default": 1,
                                 "aten.repeat_interleave.Tensor": 1}, dict(syncs.by_op)
    with HostSyncCounter() as none:
        torch.where(mask, t, torch.zeros_like(t)).masked_fill_(mask, 0.0).sum()
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
    assert none.count == 0, dict(none.by_op)


@pytest.mark.parametrize("keep", ["best", "last"])
@pytest.mark.parametrize("objective", ["ce", "cas", "cw_cas"])
def test_pgd_steps_make_no_host_sync(as_on_a_gpu, keep, objective):
    model = cas_model().eval()
    x, y = separable_data(16, seed=1, num_classes=4)
    pgd(model, x, y, steps=1)  # the first forward in eval mode runs the input-range check (once per mode)
    with HostSyncCounter() as syncs:
        pgd(model, x, y, eps=8 / 255, steps=5, keep=keep, objective=objective, return_info=True)
    assert syncs.count == 0, dict(syncs.by_op)


def test_straight_through_pgd_makes_no_host_sync(as_on_a_gpu):
    model = cas_model().eval()
    x, y = separable_data(16, seed=1, num_classes=4)
    pgd(model, x, y, steps=1)
    with HostSyncCounter() as syncs:
        pgd(model, x, y, steps=5, objective="cas", routing="straight-through")
    assert syncs.count == 0, dict(syncs.by_op)


def test_half_precision_pgd_syncs_at_most_once_per_step(as_on_a_gpu):
    """Under autocast a gradient may underflow; deciding whether to retry it (a second backward) reads one flag."""
    model = cas_model().eval()
    x, y = separable_data(16, seed=1, num_classes=4)
    pgd(model, x, y, steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16), HostSyncCounter() as syncs:
        pgd(model, x, y, steps=5, objective="cas")
    assert syncs.count <= 5, dict(syncs.by_op)


def test_input_range_check_reads_once_per_mode_when_modes_alternate(as_on_a_gpu):
    model = cas_model()
    x, y = separable_data(8, seed=1, num_classes=4)
    with HostSyncCounter() as syncs, casify.route(model, labels=y):
        for _ in range(4):  # adversarial training: an eval-mode attack, then a train-mode update, every step
            model.eval()(x)
            model.train()(x)
    # one min/max read back per mode (2 reads each), not per switch
    assert syncs.by_op == {"aten._local_scalar_dense.default": 2 * 2}, dict(syncs.by_op)


def test_route_checks_labels_on_the_device_without_a_sync(as_on_a_gpu):
    model = cas_model()
    x, y = separable_data(8, seed=1, num_classes=4)
    with HostSyncCounter() as syncs, casify.route(model, labels=y):
        model.train()(x)
    assert syncs.count == 2, dict(syncs.by_op)  # the input-range check's min and max, nothing for the labels
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 3\]"):
        with casify.route(model, labels=torch.tensor([0, 4])):
            pass


def test_route_refuses_out_of_range_labels_with_the_values_on_cpu():
    model = cas_model()
    with pytest.raises(ValueError, match=r"got values in \[0, 7\]"):
        with casify.route(model, labels=torch.tensor([0, 7])):
            pass


def test_training_steps_make_no_host_sync_between_log_steps(as_on_a_gpu):
    per_step = {}
    run_counting_per_step(dict(attack_steps=2, log_every_steps=4), per_step)
    assert len(per_step) == 11
    # A log step reads the window's means back (on a GPU: one device -> host copy); every other step reads nothing.
    quiet = {step: ops for step, ops in per_step.items() if step % 4}
    assert quiet and all(not ops for ops in quiet.values()), quiet


def run_counting_per_step(config_kwargs, steps_seen):
    """Train 12 steps of 8 on separable data; ``steps_seen[step]`` = the syncs from the end of the previous optimizer
    step (the Trainer's callbacks) to the end of this one."""
    x, y = separable_data(96, seed=2, num_classes=4)

    class CountPerStep:
        counter = None

        def __call__(self, trainer):
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                steps_seen[trainer.state.global_step] = dict(self.counter.by_op)
            self.counter = HostSyncCounter()
            self.counter.__enter__()

    callback = CountPerStep()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(method="at", cas=True, epochs=1, batch_size=8, schedule="constant", progress=False,
                             output_dir=out, **config_kwargs)
        try:
            Trainer(cas_model(), TensorDataset(x, y), None, config, callbacks=[callback]).train()
        finally:
            if callback.counter is not None:
                callback.counter.__exit__(None, None, None)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed-precision setting per process; its own test utilities reset it like this."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_training_steps_sync_once_per_attack_step(as_on_a_gpu, fresh_accelerate_state):
    """Under bf16 autocast the training attack reads one flag per step (the underflow retry); nothing else does."""
    per_step = {}
    run_counting_per_step(dict(attack_steps=3, mixed_precision="bf16", log_every_steps=4), per_step)
    quiet = [ops for step, ops in per_step.items() if step % 4]
    assert quiet and all(ops == {"aten._local_scalar_dense.default": 3} for ops in quiet), quiet


def test_validation_data_outside_the_pixel_range_stops_the_run(as_on_a_gpu):
    """A validation set is a new data source: 0..255 pixels there stop the run at the attack's input check (on a GPU
    a device-side assertion, no host read), instead of validating on clamped images."""
    x, y = separable_data(32, seed=2, num_classes=4)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(method="at", cas=True, epochs=1, batch_size=8, attack_steps=1, progress=False,
                             output_dir=out, val_max_examples=None)
        with pytest.raises(ValueError, match="divide by 255"):  # the Trainer reads the first image: refused at once
            Trainer(cas_model(), TensorDataset(x, y), TensorDataset(255 * x, y), config)
        later = x.clone()
        later[8:] *= 255  # past the first image: the attack's input check stops the run
        trainer = Trainer(cas_model(), TensorDataset(x, y), TensorDataset(later, y), config)
        with pytest.raises(RuntimeError, match=r"pixels in \[0, 1\]"):
            trainer.train()


def test_log_every_steps_must_be_positive():
    with pytest.raises(ValueError, match="log_every_steps must be at least 1"):
        TrainConfig(log_every_steps=0)
