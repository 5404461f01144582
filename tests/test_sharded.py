"""Sharded training (FSDP2): the Trainer trains a wrapped model whose parameters are sharded over two processes, with
label routing, auxiliary logits, validation, ``save_pretrained`` and Accelerate's sharded checkpoints working.

Accelerate only selects FSDP for GPU-like backends (``AcceleratorState`` turns ``fsdp_plugin`` into
``DistributedType.FSDP`` for MULTI_GPU/NPU/XPU/..., never for MULTI_CPU), although PyTorch's ``fully_shard`` runs on
CPU over gloo. So this test starts two gloo CPU processes with torchrun, builds the Accelerator the Trainer would build
(``cpu=True``) with an FSDP2 plugin, and sets the distributed type to FSDP by hand: from there on every line that runs
is Accelerate's FSDP2 path (``fully_shard`` in ``prepare``, ``get_state_dict``, ``save_state``/``load_state`` with
torch.distributed.checkpoint) and casify's Trainer, unchanged. On GPUs, ``accelerate launch --config_file
recipes/accelerate/fsdp.yaml`` selects the same path without any of this.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(ROOT / "tests"))
    import casify
    from casify.train import Trainer, TrainConfig
    from conftest import TinyNet, separable_data

    torch.set_num_threads(1)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="NO_WRAP", reshard_after_forward=True,
                                            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    for state in (PartialState(), AcceleratorState()):  # see the module docstring: FSDP on the gloo CPU processes
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
    assert acc.is_fsdp2

    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)
    x, y = separable_data(32, 1, 5)
    xv, yv = separable_data(16, 2, 5)
    config = TrainConfig(method="at", cas=True, attack_steps=1, val_attack_steps=1, batch_size=8, max_steps=2,
                         lr=0.05, schedule="constant", val_max_examples=16, output_dir=str(out), progress=False)
    trainer = Trainer(model, torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(xv, yv), config,
                      accelerator=acc)
    sharded = trainer.model
    assert isinstance(sharded, FSDPModule) and isinstance(sharded, casify.DefendedModel)
    weight = sharded.cas_modules.block.classifier.weight
    assert isinstance(weight, DTensor) and weight.to_local().shape[0] < weight.shape[0]  # really sharded
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.history[-1]["val_count"] == 16  # validated, gathered

    # label routing and auxiliary logits on the sharded model
    xb, yb = x[:4], y[:4]
    sharded.eval()
    with torch.no_grad():
        with casify.route(sharded, labels=yb):
            routed = sharded(xb)
            aux = casify.aux_logits(sharded)
        with casify.route(sharded, labels=(yb + 1) % 5):
            rerouted = sharded(xb)
        with casify.route(sharded, labels=None):
            predicted = sharded(xb)
    assert len(aux) == 1 and aux[0].shape == (4, 5) and sharded.cas_outputs["block"].shape == (4, 5)
    assert not torch.equal(routed, rerouted)  # the routed class's weight row (a gathered shard) masks the channels

    # the saved model is the full model: it reloads unsharded and computes what the sharded one does
    full = acc.get_state_dict(sharded)  # a collective
    if acc.is_main_process:
        loaded = casify.from_pretrained(out / "final", model=TinyNet()).eval()
        assert set(loaded.state_dict()) == set(full)
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, full[key], rtol=0, atol=0, msg=key)
        with torch.no_grad():
            torch.testing.assert_close(loaded(xb), predicted)
            with casify.route(loaded, labels=yb):
                torch.testing.assert_close(loaded(xb), routed)

    # Accelerate's sharded checkpoint (torch.distributed.checkpoint) of the wrapped model round-trips
    ckpt = out / "sharded-state"
    acc.save_state(str(ckpt), safe_serialization=True)
    acc.wait_for_everyone()
    from casify.train.sharded_checkpoint import verify_sharded_checkpoint
    assert verify_sharded_checkpoint(ckpt) >= 2  # model and optimizer metadata read as data (casify's resume check)
    with torch.no_grad():
        for p in sharded.parameters():
            p.zero_()
    acc.load_state(str(ckpt))
    after = acc.get_state_dict(sharded)
    if acc.is_main_process:
        for key, value in full.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
        print("SHARDED-OK")
    dist.barrier()


def test_fsdp2_trains_routes_saves_and_reloads_a_wrapped_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
