"""train.log_with: checked when the settings are read; a run logs to TensorBoard and the event file holds it."""
import pytest
import torch
from torch.utils.data import TensorDataset

import casify
from casify.train.trackers import flat_config
from casify.train import TrainConfig, Trainer


def test_unknown_or_missing_trackers_fail_before_anything_is_built(monkeypatch):
    with pytest.raises(ValueError, match="not a tracker Accelerate knows"):
        TrainConfig(log_with="csv")
    import accelerate.utils
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"casify-robust\[tensorboard\]"):
        TrainConfig(log_with="tensorboard")


def test_the_config_is_flattened_to_scalars_every_tracker_takes():
    flat = flat_config(TrainConfig().to_dict())
    assert flat["milestones"] == "[75, 90]" and flat["max_steps"] == "none" and flat["lr"] == 0.1
    assert flat_config({"loss_kwargs": {"lambda_": 6.0}, "empty": {}}) == {"loss_kwargs.lambda_": 6.0, "empty": "{}"}
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_a_run_logs_to_tensorboard_and_the_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from conftest import TinyNet

    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), layers=["stem"], input_size=(3, 8, 8), normalize=None)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))
    config = TrainConfig(method="at", epochs=1, batch_size=8, attack_steps=1, eps=2 / 255, log_with="tensorboard",
                         log_every_steps=1, output_dir=str(tmp_path), progress=False, val_max_examples=8)
    Trainer(model, data, data, config).train(resume=False)
    events = sorted((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no event file under {tmp_path / 'logs'}"
    scalars = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    # grouped: TensorBoard shows a "train" and a "val" section, not one flat list
    assert {"train/loss", "train/lr", "val/pgd", "val/natural"} <= scalars, scalars
    assert not any("/" not in tag for tag in scalars), scalars
