"""train.compile and train.channels_last: compiled once, few graphs, the same training as eager."""
import torch
from torch._dynamo import register_backend
from torch._dynamo.testing import CompileCounter

from test_reproducible_runs import _augmented_data, _config, _model, _weights
from casify.train import Trainer

COUNTER = CompileCounter()
register_backend(name="casify_test_counter")(COUNTER)  # runs the captured graphs eagerly and counts them


def test_compiled_run_uses_one_graph_per_phase_and_trains_like_eager(tmp_path, one_thread):
    torch._dynamo.reset()
    COUNTER.clear()
    config = dict(epochs=2, checkpoint_every_steps=None, val_max_examples=16)
    eager = Trainer(_model(), _augmented_data(), _augmented_data(16, 1), _config(tmp_path / "eager", **config))
    eager.train()
    compiled = Trainer(_model(), _augmented_data(), _augmented_data(16, 1),
                       _config(tmp_path / "compiled", compile=True, compile_backend="casify_test_counter", **config))
    compiled.train()
    # 12 steps of attack + update and 2 validations: the update (train mode, label routing), the attack (eval mode,
    # predicted routing, input gradients) and the validation's scoring (eval mode, no grad) are compiled once each.
    assert 1 <= COUNTER.frame_count <= 3, COUNTER.frame_count
    # The counting backend runs the captured aten graphs eagerly, in the same order: the same arithmetic as eager.
    for k, v in _weights(eager).items():
        torch.testing.assert_close(_weights(compiled)[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_channels_last_trains_in_nhwc_like_the_default_layout(tmp_path, one_thread):
    # natural training: NHWC and NCHW kernels round differently, and a PGD sign step would turn that into a different
    # trajectory; without the attack the two runs stay within float noise on any CPU
    config = dict(epochs=1, checkpoint_every_steps=None, method="standard")
    plain = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "plain", **config))
    plain.train()
    nhwc = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "nhwc", channels_last=True, **config))
    nhwc.train()
    stem = nhwc.accelerator.unwrap_model(nhwc.model).stem.weight
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    for k, v in _weights(plain).items():
        torch.testing.assert_close(_weights(nhwc)[k], v, rtol=1e-3, atol=1e-4, msg=k)


def test_cudnn_benchmark_is_a_process_switch_outside_the_runs_identity(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = dict(epochs=1, checkpoint_every_steps=None, method="standard")
    Trainer(_model(), _augmented_data(), None, _config(tmp_path / "off", **config))
    assert torch.backends.cudnn.benchmark is False

    def stop_after_one_step(trainer):
        trainer.stop = True

    first = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "run", cudnn_benchmark=True, **config),
                    callbacks=[stop_after_one_step])
    assert torch.backends.cudnn.benchmark is True
    assert first.train().global_step == 1
    # the same run resumes with the switch off: it picks among algorithms for the same convolutions
    again = Trainer(_model(), _augmented_data(), None, _config(tmp_path / "run", **config))
    assert again.train(resume=True).global_step == again.total_steps > 1
