"""The CAS module against a hand computation from its own weights."""
import pytest
import torch

import casify
from casify import CASModule


def _hand(f, weight, bias, rows, channel_dim):
    pool_dims = tuple(d for d in range(1, f.dim()) if d != channel_dim)
    pooled = f.mean(dim=pool_dims) if pool_dims else f  # (N, C) features: no positions to pool
    aux = pooled @ weight.T + bias
    mask = weight[rows] if rows is not None else weight[aux.argmax(1)]
    shape = [f.shape[0]] + [1] * (f.dim() - 1)
    shape[channel_dim] = f.shape[channel_dim]
    return f * mask.view(shape), aux


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "tokens", "features"])
def test_output_and_aux_logits_equal_hand_computation_in_both_routing_modes(layout):
    torch.manual_seed(0)
    shapes = {"nchw": ((4, 6, 5, 5), 1, 4), "nhwc": ((4, 5, 5, 6), 3, 4), "tokens": ((4, 7, 6), 2, 3),
              "features": ((4, 6), 1, 2)}
    shape, channel_dim, ndim = shapes[layout]
    f = torch.randn(shape)
    module = CASModule(6, 3, channel_dim=channel_dim, ndim=ndim, init="paper")
    w, b = module.classifier.weight, module.classifier.bias
    y = torch.tensor([0, 2, 1, 2])
    with casify.route(module, labels=y):
        out = module(f)
    ref, aux = _hand(f, w, b, y, channel_dim)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(module.last_aux_logits, aux)
    module.eval()
    out = module(f)
    ref, aux = _hand(f, w, b, None, channel_dim)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(module.last_aux_logits, aux)


def test_mask_is_raw_signed_row_and_nothing_is_detached():
    torch.manual_seed(0)
    module = CASModule(4, 3, init="paper")
    with torch.no_grad():
        module.classifier.weight[1] = torch.tensor([-2.0, 0.5, 0.0, 3.0])
    f = torch.ones(1, 4, 2, 2, requires_grad=True)
    with casify.route(module, labels=torch.tensor([1])):
        out = module(f)
    assert out[0, :, 0, 0].tolist() == [-2.0, 0.5, 0.0, 3.0]
    (out.sum() + module.last_aux_logits.sum()).backward()
    grad = module.classifier.weight.grad
    # Row 1 gets gradient from the mask (sum of f over positions = 4) and from the aux logits (pooled f = 1).
    torch.testing.assert_close(grad[1], torch.full((4,), 5.0))
    torch.testing.assert_close(grad[0], torch.ones(4))  # aux logits only
    assert f.grad is not None and torch.count_nonzero(f.grad) > 0


def test_soft_routing_mixes_weight_rows():
    torch.manual_seed(0)
    module = CASModule(4, 3, init="paper")
    f = torch.randn(2, 4, 3, 3)
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    with casify.route(module, labels=weights):
        out = module(f)
    mask = weights @ module.classifier.weight
    torch.testing.assert_close(out, f * mask[:, :, None, None])


def test_identity_init_passes_input_through():
    module = CASModule(8, 10, init="identity")
    f = torch.randn(3, 8, 4, 4)
    module.eval()
    torch.testing.assert_close(module(f), f)
    assert torch.equal(module.classifier.weight, torch.ones(10, 8))


def test_paper_init_is_pytorch_default_linear():
    torch.manual_seed(123)
    module = CASModule(8, 10, init="paper")
    torch.manual_seed(123)
    reference = torch.nn.Linear(8, 10)
    torch.testing.assert_close(module.classifier.weight, reference.weight)
    torch.testing.assert_close(module.classifier.bias, reference.bias)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="init must be one of"):
        CASModule(4, 2, init="zeros")
    with pytest.raises(ValueError, match="ndim"):
        CASModule(4, 2, ndim=5)
    module = CASModule(4, 2)
    with pytest.raises(ValueError, match="4 channels on axis 1"):
        module(torch.randn(2, 5, 3, 3))


def test_without_suppression_the_activation_passes_unmasked_but_aux_logits_are_computed():
    torch.manual_seed(0)
    module = CASModule(4, 3, init="paper", suppress=False)
    f = torch.randn(2, 4, 3, 3)
    with casify.route(module, labels=torch.tensor([0, 1])):
        out = module(f)
    assert out is f
    torch.testing.assert_close(module.last_aux_logits, module.classifier(f.mean(dim=(2, 3))))


def test_copies_drop_the_live_aux_logits_and_the_routing():
    """deepcopy refuses non-leaf tensors; the aux logits of a forward are one, and a route context is the original's."""
    import copy
    torch.manual_seed(0)
    module = CASModule(4, 3, init="paper")
    f = torch.randn(2, 4, 3, 3)
    with casify.route(module, labels=torch.tensor([0, 2])):
        module(f).sum().backward()
        twin = copy.deepcopy(module)
        assert module._route is not None and module.last_aux_logits is not None
    assert twin._route is None and twin.last_aux_logits is None
    assert twin.classifier.weight is not module.classifier.weight
    torch.testing.assert_close(twin.classifier.weight, module.classifier.weight)
    twin.eval()
    torch.testing.assert_close(twin(f), module.eval()(f))
