"""A run folder is data that belongs to one process: resuming never runs code planted in it, a damaged checkpoint is
refused or skipped with a warning (never a silent restart or a silently different run), and a second process
training into the same folder is refused at once."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import casify
from casify.train import RunFolderError, TrainConfig, Trainer
from casify.train.checkpoint_files import CheckpointError, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _model():
    from conftest import TinyNet
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)


def _config(path, **kw):
    base = dict(method="at", cas=True, epochs=1, max_steps=4, batch_size=8, lr=0.05, eps=4 / 255, attack_steps=1,
                output_dir=str(path), progress=False, val_max_examples=8, checkpoint_every_steps=1,
                keep_checkpoints=2, schedule="cosine")
    base.update(kw)
    return TrainConfig(**base)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}


class Crash(RuntimeError):
    pass


def _crash_at(step):
    def callback(trainer):
        if trainer.state.global_step == step:
            raise Crash()
    return callback


def _crashed_run(folder, step=3):
    with pytest.raises(Crash):
        Trainer(_model(), _data(), None, _config(folder), callbacks=[_crash_at(step)]).train()
    return folder / "checkpoints"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    trainer = Trainer(_model(), _data(), None, _config(tmp_path_factory.mktemp("reference")))
    trainer.train()
    return _weights(trainer)


def _assert_same(a, b):
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not differ, differ[:3]


class WritesAMarker:
    """A pickle whose loading creates a file: what an attacker plants in a run folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- item 5: no code from the run folder ----------------------------------------------------------------------------
def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, one_thread):
    """Accelerate names a registered object's state ``custom_checkpoint_<i>.pkl`` and reads it with
    weights_only=False; casify registers none and refuses files its manifest does not list."""
    root = _crashed_run(tmp_path / "run", step=4)  # a finished run: a rerun loads its latest checkpoint
    marker = tmp_path / "pwned"
    for step in (3, 4):
        torch.save(WritesAMarker(marker), root / f"step-{step:08d}" / "custom_checkpoint_0.pkl")
        torch.save({"random_state": WritesAMarker(marker)}, root / f"step-{step:08d}" / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match="files casify did not write there.*custom_checkpoint_0.pkl"):
        Trainer(_model(), _data(), None, _config(tmp_path / "run")).train()
    assert not marker.exists()
    assert (root / "step-00000004" / "custom_checkpoint_0.pkl").stat().st_size > 0  # still there, never loaded


def test_a_pickle_in_a_file_casify_reads_is_refused_even_with_a_matching_manifest(tmp_path, one_thread):
    """An attacker who rewrites the manifest too: the files casify reads are read with weights_only=True."""
    root = _crashed_run(tmp_path / "run", step=4)
    marker = tmp_path / "pwned"
    latest = root / "step-00000004"
    torch.save({"state": {}, "param_groups": [], "payload": WritesAMarker(marker)}, latest / "optimizer.bin")
    torch.save(WritesAMarker(marker), latest / "custom_checkpoint_0.pkl")
    write_manifest(latest)
    with pytest.raises(CheckpointError, match=r"optimizer\.bin holds objects that need code to load"):
        Trainer(_model(), _data(), None, _config(tmp_path / "run")).train()
    assert not marker.exists()


def test_a_checkpoint_holds_no_pickle_but_what_is_read_with_weights_only(tmp_path, one_thread):
    root = _crashed_run(tmp_path / "run", step=2)
    names = sorted(p.name for p in (root / "step-00000002").iterdir())
    assert not [n for n in names if n.endswith(".pkl")], names
    assert {"manifest.json", "model.safetensors", "optimizer.bin", "scheduler.bin", "rng_state_0.json",
            "rng_state_0.safetensors", "trainer_state.json"} <= set(names)


# -- item 6: checked on resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip a weight bit", "empty RNG state", "missing RNG state", "truncated optimizer",
                                    "empty trainer_state.json"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning_and_the_run_ends_bit_identical(
        tmp_path, damage, reference, one_thread):
    root = _crashed_run(tmp_path)
    latest = root / "step-00000003"
    target = {"flip a weight bit": "model.safetensors", "empty RNG state": "rng_state_0.json",
              "missing RNG state": "rng_state_0.safetensors", "truncated optimizer": "optimizer.bin",
              "empty trainer_state.json": "trainer_state.json"}[damage]
    path = latest / target
    data = bytearray(path.read_bytes())
    if damage == "flip a weight bit":
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "missing RNG state":
        path.unlink()
    elif damage == "truncated optimizer":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.write_bytes(b"")
    resumed = Trainer(_model(), _data(), None, _config(tmp_path))
    with pytest.warns(UserWarning, match=rf"resuming from .*step-00000002.*{target}"):
        resumed.train()
    assert resumed.state.global_step == 4
    _assert_same(reference, _weights(resumed))


@pytest.mark.parametrize("pointer", ["missing", "empty", "dangling", "outside the run folder"])
def test_a_bad_latest_pointer_falls_back_to_the_newest_intact_checkpoint_saying_so(
        tmp_path, pointer, reference, one_thread):
    root = _crashed_run(tmp_path)
    latest = root / "latest"
    if pointer == "missing":
        latest.unlink()
    else:
        latest.write_text({"empty": "", "dangling": "step-00000099", "outside the run folder": "../../elsewhere"}[pointer])
        if pointer == "outside the run folder":
            (tmp_path.parent / "elsewhere").mkdir(exist_ok=True)
    resumed = Trainer(_model(), _data(), None, _config(tmp_path))
    with pytest.warns(UserWarning, match=r"resuming from .*step-00000003.*latest"):
        resumed.train()
    _assert_same(reference, _weights(resumed))


def test_no_intact_checkpoint_is_refused_never_a_silent_restart_from_step_0(tmp_path, one_thread):
    root = _crashed_run(tmp_path)
    for step in (2, 3):
        (root / f"step-{step:08d}" / "scheduler.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from .*scheduler\.bin is empty.*"
                                              r"--no_resume --overwrite"):
        Trainer(_model(), _data(), None, _config(tmp_path)).train()
    (root / "latest").write_text("")
    for step in (2, 3):
        import shutil
        shutil.rmtree(root / f"step-{step:08d}")
    with pytest.raises(CheckpointError, match=r"latest is empty"):
        Trainer(_model(), _data(), None, _config(tmp_path)).train()


def test_a_checkpoint_without_a_manifest_is_refused(tmp_path, one_thread):
    root = _crashed_run(tmp_path, step=2)
    for path in root.glob("step-*/manifest.json"):
        path.unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        Trainer(_model(), _data(), None, _config(tmp_path)).train()


# -- item 7: one process per run folder -----------------------------------------------------------------------------
RUN_SCRIPT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_run_folder_safety as t
from casify.train import Trainer
folder, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def wait_at_step_1(trainer):
    if trainer.state.global_step == 1 and sys.argv[4] == "wait":
        ready.write_text("1")
        deadline = time.time() + 60
        while not go.exists() and time.time() < deadline:
            time.sleep(0.05)

Trainer(t._model(), t._data(), None, t._config(folder), callbacks=[wait_at_step_1]).train()
print("TRAINED")
"""


def _start(tmp_path, folder, mode):
    script = tmp_path / "run_into.py"
    script.write_text(RUN_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(script), str(folder), str(tmp_path / "ready"), str(tmp_path / "go"),
                             mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, seconds=60):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first run never reached step 1"
        time.sleep(0.05)


def test_a_second_run_into_the_same_folder_is_refused_at_once_naming_the_holder(tmp_path, one_thread):
    """The first run in a subprocess, held at step 1; the second (here, in this process: one interpreter start less)
    is refused before it trains a step, then the first finishes untouched."""
    from casify.train import RunFolderLocked
    folder = tmp_path / "run"
    first = _start(tmp_path, folder, "wait")
    try:
        _wait_for(tmp_path / "ready", first)
        second = Trainer(_model(), _data(), None, _config(folder))
        started = time.monotonic()
        with pytest.raises(RunFolderLocked, match=rf"in use by another casify run \(PID {first.pid} on host .*, "
                                                  r"started 20.*run_into\.py.*choose another output_dir"):
            second.train()
        assert time.monotonic() - started < 5 and second.state.global_step == 0
    finally:
        (tmp_path / "go").write_text("1")
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "TRAINED" in out, err[-3000:]
    assert json.loads((folder / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_lock_left_by_a_killed_run_is_taken_over_and_its_half_written_files_cleaned(tmp_path, one_thread):
    folder = tmp_path / "run"
    killed = _start(tmp_path, folder, "wait")
    _wait_for(tmp_path / "ready", killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    holder = json.loads((folder / ".casify-run.lock.json").read_text())
    assert holder["pid"] == killed.pid
    # what a kill mid-write leaves (atomic_write's temporary files, a checkpoint being written)
    (folder / "final").mkdir()
    leftovers = [folder / "final" / ".model.safetensors.casify-tmp-k2j4h5g6", folder / ".run_config.json.abcd1234",
                 folder / "checkpoints" / ".tmp-step-00000002"]
    leftovers[0].write_bytes(b"half")
    leftovers[1].write_text("{")
    leftovers[2].mkdir()
    keep = folder / "notes.txt"
    keep.write_text("mine")
    trainer = Trainer(_model(), _data(), None, _config(folder))
    with pytest.warns(UserWarning, match=rf"took over the lock left by PID {killed.pid}"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert not [p for p in leftovers if p.exists()] and keep.exists()
    assert not (folder / ".casify-run.lock.json").exists()  # released at the end


def test_the_lock_is_reentrant_within_a_process_and_released_after_an_error(tmp_path, one_thread):
    trainer = Trainer(_model(), _data(), None, _config(tmp_path, max_steps=1))
    with trainer.holding_run_folder():
        trainer.train()  # takes the lock again: not refused
        assert (tmp_path / ".casify-run.lock.json").exists()
    assert not (tmp_path / ".casify-run.lock.json").exists()
    with pytest.raises(Crash):
        Trainer(_model(), _data(), None, _config(tmp_path / "b"), callbacks=[_crash_at(1)]).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released by the crash: no take-over warning, no refusal
        assert Trainer(_model(), _data(), None, _config(tmp_path / "b")).train().global_step == 4


# -- item 8: the run folder's one-line errors -----------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_or_too_long_a_name_is_one_clear_error(tmp_path, one_thread):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match=r"output_dir .*afile is a file, not a folder"):
        Trainer(_model(), _data(), None, _config(tmp_path / "afile")).train()
    with pytest.raises(RunFolderError, match=r"longer than the file system allows .*shorter output_dir"):
        Trainer(_model(), _data(), None, _config(tmp_path / ("x" * 300))).train()


def test_a_full_disk_while_saving_a_checkpoint_is_one_clear_error_and_leaves_no_partial_folder(
        tmp_path, one_thread, monkeypatch):
    import errno
    trainer = Trainer(_model(), _data(), None, _config(tmp_path))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("scheduler.bin"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunFolderError, match=r"cannot write a checkpoint to .*no space is left on the device; free "
                                             r"space.*rerun the same command"):
        trainer.train()
    assert not list((tmp_path / "checkpoints").glob(".tmp-step-*"))


class _Planted:
    """Writes a marker file when unpickled: what a hostile checkpoint item would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_sharded_checkpoint_is_read_as_data_only(tmp_path):
    """FSDP resumes go through torch.distributed.checkpoint, which unpickles its .metadata and non-tensor items in
    full: casify reads both as data first, so a planted pickle (even with the manifest rewritten) never runs."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from casify.train.sharded_checkpoint import ShardedCheckpointError, verify_sharded_checkpoint
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    clean = tmp_path / "clean"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group says so
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}, checkpoint_id=str(clean))
    assert verify_sharded_checkpoint(clean) == 1
    marker = tmp_path / "ran"
    (clean / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ShardedCheckpointError, match="not a plain checkpoint metadata file"):
        verify_sharded_checkpoint(clean)
    hostile = tmp_path / "hostile"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "extra": _Planted(marker)}, checkpoint_id=str(hostile))
    with pytest.raises(ShardedCheckpointError, match="holds extra, which needs code to load"):
        verify_sharded_checkpoint(hostile)
    assert not marker.exists()
