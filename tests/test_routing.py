"""Label routing: labels inside the context, own prediction outside, independent of train/eval, through DDP."""
import warnings

import pytest
import torch
import torch.distributed as dist

import casify
from casify import CASRoutingWarning


@pytest.fixture
def wrapped(tiny_net):
    torch.manual_seed(1)
    return casify.wrap(tiny_net, layers=["stem", "block"], init="paper", normalize=None, input_size=(3, 8, 8))


def _masks_used(model, x):
    """Which weight row each module used: recover it from the module's output / input ratio."""
    rows = []
    recorded = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: recorded.__setitem__(k, (inp[0], out)))
             for k, m in enumerate(casify.find_cas_modules(model))]
    model(x)
    for h in hooks:
        h.remove()
    for k, m in enumerate(casify.find_cas_modules(model)):
        f, out = recorded[k]
        ratio = (out / f).mean(dim=(2, 3))  # (N, C) = the mask
        dist_to_rows = torch.cdist(ratio, m.classifier.weight.detach())
        rows.append(dist_to_rows.argmin(1))
    return rows


@pytest.mark.parametrize("training", [True, False])
def test_labels_inside_prediction_outside_whatever_the_mode(wrapped, training):
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    wrapped.train(training)
    with casify.route(wrapped, labels=y):
        rows = _masks_used(wrapped, x)
    assert len(rows) == 2
    for r in rows:
        assert torch.equal(r, y)
    with casify.route(wrapped, labels=None):
        rows = _masks_used(wrapped, x)
    for r, aux in zip(rows, wrapped.cas_outputs.values()):
        assert torch.equal(r, aux.argmax(1))


def test_each_module_routes_by_its_own_prediction(wrapped):
    wrapped.eval()
    x = torch.rand(16, 3, 8, 8)
    rows = _masks_used(wrapped, x)
    preds = [a.argmax(1) for a in wrapped.cas_outputs.values()]
    assert all(torch.equal(r, p) for r, p in zip(rows, preds))
    assert not torch.equal(preds[0], preds[1])  # two modules, two different routings on this seed


def test_training_forward_without_labels_warns(wrapped):
    wrapped.train()
    with pytest.warns(CASRoutingWarning, match="without labels"):
        wrapped(torch.rand(2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CASRoutingWarning)
        with casify.route(wrapped, labels=None):
            wrapped(torch.rand(2, 3, 8, 8))
        wrapped.eval()
        wrapped(torch.rand(2, 3, 8, 8))


def test_contexts_nest_and_restore(wrapped):
    y1, y2 = torch.tensor([1, 1]), torch.tensor([2, 2])
    modules = casify.find_cas_modules(wrapped)
    with casify.route(wrapped, labels=y1):
        with casify.route(wrapped, labels=y2):
            assert all(torch.equal(m._route[1], y2) for m in modules)
        assert all(torch.equal(m._route[1], y1) for m in modules)
    assert all(m._route is None for m in modules)


def test_bad_labels_are_explained(wrapped):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        with casify.route(wrapped, labels=torch.tensor([0, 5])):
            pass
    with pytest.raises(TypeError, match="integer tensor"):
        with casify.route(wrapped, labels=torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(ValueError, match="shape"):
        with casify.route(wrapped, labels=torch.zeros(2, 3, dtype=torch.long)):
            pass
    with pytest.raises(TypeError, match="torch.Tensor"):
        with casify.route(wrapped, labels=[0, 1]):
            pass
    with casify.route(wrapped, labels=torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match="labels for 3 examples but the batch has 2"):
            wrapped(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no CAS modules"):
        with casify.route(torch.nn.Linear(2, 2), labels=torch.tensor([0])):
            pass


def test_routing_through_ddp_wrapper(wrapped, tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped)
        ddp.train()
        x, y = torch.rand(4, 3, 8, 8), torch.tensor([4, 3, 2, 1])
        with casify.route(ddp, labels=y):
            logits = ddp(x)
            rows = _masks_used(ddp, x)
        assert all(torch.equal(r, y) for r in rows)
        aux = casify.aux_logits(ddp)
        assert len(aux) == 2 and aux[0].shape == (4, 5)
        loss = torch.nn.functional.cross_entropy(logits, y) + sum(torch.nn.functional.cross_entropy(a, y) for a in aux)
        loss.backward()
        assert all(m.classifier.weight.grad is not None for m in casify.find_cas_modules(ddp))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("routing", ["label", "predicted", "soft"])
def test_training_routings_for_the_leak_study(wrapped, routing):
    """train_route: the true label (the paper), each module's own argmax, or its softmax mixture of rows; only
    "label" lets the label into the mask, and none leaves a router behind."""
    from casify.core.routing import train_route
    wrapped.train()
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    seen = []
    modules = casify.find_cas_modules(wrapped)
    original = [m.channel_importance for m in modules]
    for m, orig in zip(modules, original):
        m.channel_importance = lambda r, orig=orig: (seen.append(r), orig(r))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CASRoutingWarning)  # label-free routings are on purpose: no warning
        with train_route(wrapped, y, routing):
            wrapped(x)
    for m in modules:
        del m.channel_importance
    if routing == "label":
        assert all(torch.equal(r, y) for r in seen)
    elif routing == "predicted":
        assert all(r.dim() == 1 for r in seen)
        assert [torch.equal(r, m.last_aux_logits.argmax(1)) for r, m in zip(seen, modules)] == [True, True]
    else:
        assert all(r.dim() == 2 and torch.allclose(r.sum(1), torch.ones(4)) for r in seen)
        assert all(r.requires_grad for r in seen)  # differentiable: the heads learn through the mask
    assert all(m.router is None and m.route_state is None for m in modules)
    with pytest.raises(ValueError, match="train routing"):
        with train_route(wrapped, y, "oracle"):
            pass
    with pytest.raises(ValueError, match="train_routing"):
        casify.losses.get_loss("at", cas=True, train_routing="oracle")
