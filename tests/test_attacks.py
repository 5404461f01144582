"""Attacks: ball and box constraints, strength, side-effect freedom, objectives, routing and half precision."""
import pytest
import torch
import torch.nn.functional as F

import casify
from casify import attacks
from conftest import SmallConvNet, natural_loss, separable_data
from casify.attacks import Attack, ObjectiveInput, cw_inf, fgsm, get_objective, pgd

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 4


def make_data(n: int, seed: int):
    return separable_data(n, seed, NUM_CLASSES)


def cas_net(seed: int = 0, init: str = "paper"):
    torch.manual_seed(seed)
    return casify.wrap(SmallConvNet(NUM_CLASSES), layers=["relu2", "relu3"], input_size=(3, 8, 8), normalize=None,
                       init=init)


def train(model, steps: int = 60):
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for i in range(steps):
        x, y = make_data(64, 100 + i)
        loss = natural_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained_cas():
    return train(cas_net())


@pytest.fixture(scope="module")
def trained_plain():
    torch.manual_seed(1)
    return train(SmallConvNet(NUM_CLASSES))


@pytest.fixture(scope="module")
def batch():
    return make_data(32, 1)


def predict(model, x):
    with torch.no_grad():
        if casify.find_cas_modules(model):
            with casify.route(model, labels=None):
                return model(x).argmax(1)
        return model(x).argmax(1)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("restarts", [1, 2])
def test_pgd_stays_in_ball_and_box(trained_cas, batch, norm, eps, restarts):
    x, y = batch
    x = x.clone()
    x[:4] = 0.0  # examples on the box boundary: clipping must not push them out of the ball
    x_adv = pgd(trained_cas, x, y, eps=eps, alpha=eps / 2, steps=5, norm=norm, objective="cas", restarts=restarts,
                generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert delta.abs().max() > 0


@pytest.mark.parametrize("model_name", ["trained_cas", "trained_plain"])
def test_pgd_beats_uniform_noise(model_name, request):
    model = request.getfixturevalue(model_name)
    x, y = make_data(128, 2)
    eps = 0.05
    noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * eps).clamp(0, 1)
    x_adv = pgd(model, x, y, eps=eps, steps=10, objective="cas", generator=torch.Generator().manual_seed(4))
    acc_noise = (predict(model, noise) == y).float().mean()
    acc_pgd = (predict(model, x_adv) == y).float().mean()
    assert (predict(model, x) == y).float().mean() > 0.95
    assert acc_noise > 0.9
    assert acc_pgd < acc_noise - 0.3


def test_fgsm_and_cw_are_attacks(trained_cas, trained_plain):
    x, y = make_data(128, 2)
    runs = [(trained_cas, 0.1, lambda m: fgsm(m, x, y, eps=0.1, random_start=True, objective="cas")),
            (trained_plain, 0.1, lambda m: fgsm(m, x, y, eps=0.1)),
            (trained_plain, 0.05, lambda m: cw_inf(m, x, y, eps=0.05, alpha=0.01, steps=10, kappa=0.0)),
            (trained_cas, 0.1, lambda m: cw_inf(m, x, y, eps=0.1, alpha=0.02, steps=10))]
    for model, eps, attack in runs:
        x_adv = attack(model)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert (predict(model, x_adv) == y).float().mean() < (predict(model, x) == y).float().mean() - 0.3


def test_attacks_restore_modes_and_leave_param_grads(batch):
    model = cas_net()
    x, y = batch
    model.train()
    model.bn1.eval()  # a mixed state must come back exactly
    with casify.route(model, labels=y):
        model(x).sum().backward()
    model.fc.weight.grad = None  # a parameter without a gradient must stay without one
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    runs = [lambda: pgd(model, x, y, steps=2, objective="cas", restarts=2),
            lambda: pgd(model, x, y, steps=2, norm="l2", eps=0.5, objective="aux:1"),
            lambda: fgsm(model, x, y, random_start=True),
            lambda: cw_inf(model, x, y, steps=2),
            lambda: pgd(model, x, y, steps=2, objective="cas_kl", random_start="normal")]
    for run in runs:
        run()
        assert {name: m.training for name, m in model.named_modules()} == modes
        for name, p in model.named_parameters():
            if grads[name] is None:
                assert p.grad is None, name
            else:
                assert torch.equal(p.grad, grads[name]), name
        assert all(m._route is None for m in casify.find_cas_modules(model))


def test_attack_runs_in_eval_mode_with_predicted_routing(batch):
    model = cas_net()
    x, y = batch
    model.train()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod.training, mod._route,
                                                                          torch.is_grad_enabled())))
             for m in casify.find_cas_modules(model)]
    pgd(model, x, y, steps=2)
    assert seen and all(training is False and r == ("predicted", None) for training, r, _ in seen)
    seen.clear()
    pgd(model, x, y, steps=2, routing="labels")
    # crafting forwards (with gradient) use the given routing; scoring forwards (no gradient) the deployed one
    crafting = [r for _, r, grad in seen if grad]
    assert crafting and all(r[0] == "labels" and torch.equal(r[1], y) for r in crafting)
    assert all(r == ("predicted", None) for _, r, grad in seen if not grad)
    assert len(crafting) == 2 * 2 and len(seen) == 2 * (2 + 3)  # 2 modules x (2 gradient + 3 scoring forwards)
    seen.clear()
    soft = F.one_hot(y, NUM_CLASSES).float()
    pgd(model, x, y, steps=1, routing=soft)
    crafting = [r for _, r, grad in seen if grad]
    assert crafting and all(torch.equal(r[1], soft) for r in crafting)
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="no CAS modules"):
        pgd(SmallConvNet(NUM_CLASSES), x, y, steps=1, routing="labels")


def objective_values(model, x, y, name, **kw):
    with torch.no_grad(), casify.route(model, labels=None):
        model.eval()
        logits = model(x)
        aux = casify.aux_logits(model)
        fn, _ = get_objective(name)
        return fn(ObjectiveInput(logits, aux, y, **kw)), logits, aux


def test_cas_objective_differs_from_ce_on_cas_model(trained_cas, batch):
    x, y = batch
    ce, logits, aux = objective_values(trained_cas, x, y, "ce")
    cas, _, _ = objective_values(trained_cas, x, y, "cas", beta=2.0)
    expected = F.cross_entropy(logits, y, reduction="none") + 2.0 * torch.stack(
        [F.cross_entropy(a, y, reduction="none") for a in aux]).mean(0)
    assert torch.allclose(cas, expected)
    assert not torch.allclose(cas, ce)
    a = pgd(trained_cas, x, y, eps=0.05, steps=5, objective="ce", generator=torch.Generator().manual_seed(0))
    b = pgd(trained_cas, x, y, eps=0.05, steps=5, objective="cas", generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


def test_cas_objective_equals_ce_on_plain_model(trained_plain, batch):
    x, y = batch
    a = pgd(trained_plain, x, y, steps=3, objective="ce", generator=torch.Generator().manual_seed(0))
    b = pgd(trained_plain, x, y, steps=3, objective="cas", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_aux_objective(trained_cas, batch):
    x, y = batch
    value, _, aux = objective_values(trained_cas, x, y, "aux:0")
    assert torch.allclose(value, F.cross_entropy(aux[0], y, reduction="none"))
    x_adv = pgd(trained_cas, x, y, eps=0.05, steps=5, objective="aux:0")
    after, _, _ = objective_values(trained_cas, x_adv, y, "aux:0")
    assert after.mean() > value.mean()
    with pytest.raises(IndexError):
        pgd(trained_cas, x, y, steps=1, objective="aux:2")
    with pytest.raises(ValueError, match="CAS modules"):
        pgd(SmallConvNet(NUM_CLASSES).eval(), x, y, steps=1, objective="aux:0")
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("nope")


def test_cw_margin_is_per_example():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 5.0], [1.0, 1.0, -4.0]])
    y = torch.tensor([0, 1, 2])
    # by hand: max over wrong classes minus the true logit
    margin = torch.tensor([1.0 - 3.0, 5.0 - 2.0, 1.0 - (-4.0)])
    assert torch.allclose(attacks.cw_margin(logits, y), margin)
    fn, _ = get_objective("cw")
    assert torch.allclose(fn(ObjectiveInput(logits, [], y, kappa=4.0)), torch.tensor([-2.0, 3.0, 4.0]))
    assert torch.allclose(fn(ObjectiveInput(logits, [], y, kappa=0.0)), torch.tensor([-2.0, 0.0, 0.0]))
    # the gradient of one example's loss touches only that example's logits (no batch-summed margin)
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(ObjectiveInput(z, [], y, kappa=50.0))[0], z)
    assert g[1:].abs().sum() == 0 and g[0].abs().sum() > 0


def test_kl_objective_uses_clean_reference(trained_cas, batch):
    x, y = batch
    fn, needs_clean = get_objective("kl")
    assert needs_clean
    with torch.no_grad(), casify.route(trained_cas, labels=None):
        clean = trained_cas(x)
        clean_aux = casify.aux_logits(trained_cas)
    inp = ObjectiveInput(clean, clean_aux, y, clean_logits=clean, clean_aux=clean_aux)
    assert fn(inp).abs().max() < 1e-5
    assert get_objective("cas_kl")[0](inp).abs().max() < 1e-5
    x_adv = pgd(trained_cas, x, y, eps=0.05, steps=5, objective="cas_kl", random_start="normal")
    with torch.no_grad(), casify.route(trained_cas, labels=None):
        adv = trained_cas(x_adv)
    assert attacks.kl_per_example(clean, adv).mean() > 1e-3


def test_generator_reproducible_and_restarts_keep_successes(trained_cas):
    x, y = make_data(64, 5)
    kw = dict(eps=0.03, steps=3, objective="cas")
    a = pgd(trained_cas, x, y, generator=torch.Generator().manual_seed(7), **kw)
    b = pgd(trained_cas, x, y, generator=torch.Generator().manual_seed(7), **kw)
    c = pgd(trained_cas, x, y, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the first restart starts where the single run starts, so several restarts fool at least the same examples
    multi = pgd(trained_cas, x, y, restarts=4, generator=torch.Generator().manual_seed(7), **kw)
    fooled_single = predict(trained_cas, a) != y
    fooled_multi = predict(trained_cas, multi) != y
    assert bool((fooled_multi | ~fooled_single).all())
    assert fooled_multi.sum() >= fooled_single.sum()


def test_half_precision_gradients(trained_cas, batch):
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(trained_cas, x, y, eps=8 / 255, steps=3, objective="cas", random_start=False)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    moved = (x_adv - x).flatten(1).abs().amax(1) > 0
    assert bool(moved.all())

    def tiny(inp):  # a loss so small that its gradient underflows in float16 on the way back
        return 1e-8 * F.cross_entropy(inp.logits, inp.y, reduction="none")

    with torch.autocast("cpu", dtype=torch.float16):
        x_in = x.clone().requires_grad_(True)
        with casify.route(trained_cas, labels=None):
            loss = tiny(ObjectiveInput(trained_cas(x_in).float(), [], y))
        (raw,) = torch.autograd.grad(loss.sum(), x_in, retain_graph=True)
        assert raw.abs().max() == 0  # the failure this path exists for
        x_adv = pgd(trained_cas, x, y, eps=8 / 255, steps=1, objective=tiny, random_start=False)
    assert bool(((x_adv - x).flatten(1).abs().amax(1) > 0).all())
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_attack_spec_roundtrip_and_call(trained_cas, batch):
    x, y = batch
    spec = Attack(name="pgd5-l2", eps=0.5, steps=5, norm="l2", objective="cas")
    d = spec.to_dict()
    assert d["alpha"] == pytest.approx(2.5 * 0.5 / 5) and d["random_start"] == "uniform"
    assert Attack.from_dict(d) == spec
    out = spec(trained_cas, x, y, generator=torch.Generator().manual_seed(0))
    ref = pgd(trained_cas, x, y, eps=0.5, alpha=0.25, steps=5, norm="l2", objective="cas",
              generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)
    assert Attack(kind="fgsm", eps=8 / 255).to_dict()["alpha"] == pytest.approx(8 / 255)
    assert Attack(kind="cw").objective == "cw"
    assert attacks.get_attack("pgd20").to_dict()["steps"] == 20
    assert attacks.get_attack("trades-train", objective="kl").objective == "kl"
    with pytest.raises(ValueError):
        Attack.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        Attack(norm="l1")
