"""Mistakes and accidents around a training run end in one line that names what is wrong and what to do, never a
traceback: a full disk, an output folder that is a file, a name the file system refuses, a damaged checkpoint
file, grayscale data into an RGB model, ``--device cuda`` without a GPU."""
import errno
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import casify
from casify.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "digits_tiny_at_cas.yaml"


def _train(out, *extra):
    from casify_cli import main
    return main(["train", "--method", "at", "--config", str(TINY), "--output_dir", str(out), "--max_steps", "2",
                 "--set", "eval.max_examples=4", "--set", "eval.suite=quick", "--set", "train.val_max_examples=8",
                 "--set", "train.progress=false", "--set", "train.checkpoint_every_steps=1", *extra])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(l for l in err.splitlines() if l.startswith("casify train: error:") or l.startswith("casify eval"))
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                       "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)


def test_an_output_dir_that_is_a_file_or_a_name_too_long_is_one_line(tmp_path, capsys, offline, one_thread):
    (tmp_path / "afile").write_text("x")
    assert _train(tmp_path / "afile") == 1
    _one_line_error(capsys, "is a file, not a folder", "choose another output_dir")
    assert _train(tmp_path / ("n" * 256)) == 1
    _one_line_error(capsys, "longer than the file system allows", "shorter output_dir")


@pytest.mark.parametrize("name, needle", [("trainer_state.json", "trainer_state.json is empty"),
                                          ("scheduler.bin", "scheduler.bin is "),
                                          ("optimizer.bin", "optimizer.bin is ")])
def test_a_damaged_checkpoint_file_is_one_line_naming_the_file(tmp_path, capsys, offline, one_thread, name, needle):
    out = tmp_path / "run"
    assert _train(out) in (0, None)
    for checkpoint in (out / "checkpoints").glob("step-*"):
        path = checkpoint / name
        path.write_bytes(b"" if name.endswith(".json") else path.read_bytes()[:40])  # emptied / truncated
    capsys.readouterr()
    assert _train(out) == 1
    _one_line_error(capsys, "no intact checkpoint to resume from", needle, "--no_resume --overwrite")


def test_a_full_disk_while_saving_the_model_is_one_line(tmp_path, capsys, offline, one_thread, monkeypatch):
    import casify.io.serialization as serialization

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    assert _train(tmp_path / "run") == 1
    _one_line_error(capsys, "cannot write the", "model to", "no space is left on the device", "free space")


def test_grayscale_data_into_an_rgb_model_is_refused_before_training(tmp_path, one_thread):
    from conftest import TinyNet
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)
    gray = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 5, (16,)))
    config = TrainConfig(method="at", epochs=1, batch_size=8, output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"grayscale images \(1 channel\), shape \(1, 8, 8\), but the model takes "
                                         r"RGB images \(3 channels\): convert"):
        Trainer(model, gray, None, config)
    assert not (tmp_path / "run").exists()
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    with pytest.raises(ValueError, match="grayscale"):  # no recorded input size: the first convolution says
        Trainer(plain, gray, None, TrainConfig(**{**config.to_dict(), "cas": False}))


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    from casify_cli import main
    from conftest import TinyNet
    import numpy as np
    folder = casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None).save_pretrained(
        tmp_path / "model")
    images = (np.random.default_rng(0).random((5, 8, 8, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "data.npz", x_test=images, y_test=np.arange(5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(folder), "--arch", "conftest:TinyNet", "--data", str(tmp_path / "data.npz"),
                 "--device", "cuda", "--suite", "quick", "--max-examples", "2"]) == 1
    _one_line_error(capsys, "--device cuda: this machine has no usable CUDA GPU", "--device cpu")
    assert main(["eval", str(folder), "--data", "digits", "--device", "gpu"]) == 1
    _one_line_error(capsys, "--device gpu is not a device name")
