"""Best-iterate tracking, the straight-through routing, the adaptive CW objectives, and models whose logits depend on
their auxiliary logits. Every property here holds by construction (no assertion rests on how well a net trained)."""
import pytest
import torch
from torch import nn

import casify
from casify import attacks
from casify.attacks import Attack, ObjectiveInput, attack_context, cw_inf, fgsm, get_objective, pgd
from conftest import SmallConvNet
from test_attacks import NUM_CLASSES, cas_net, make_data, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_cas():
    return train(cas_net())


def fooled(model, x_adv, y):
    return predict(model, x_adv) != y


# -- best iterate ----------------------------------------------------------------------------------------------------
ATTACKS = {
    "pgd-linf": dict(eps=0.06, steps=10, objective="cas"),
    "pgd-linf-restarts": dict(eps=0.06, steps=6, objective="cas", restarts=3),
    "pgd-l2": dict(eps=0.6, steps=10, norm="l2", objective="cas"),
    "pgd-aux": dict(eps=0.06, steps=10, objective="aux:0"),
    "pgd-straight-through": dict(eps=0.06, steps=10, objective="cas", routing="straight-through"),
    "pgd-clean-soft": dict(eps=0.06, steps=10, objective="cas", routing="clean-soft"),
    "cw-cas": dict(eps=0.06, steps=10, objective="cw_cas"),
    "cw-aux": dict(eps=0.06, steps=10, objective="cw_aux:1"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_best_iterate_fools_every_example_the_last_iterate_fools(trained_cas, name):
    x, y = make_data(96, 11)
    kw = ATTACKS[name]
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731  (same starts: the same trajectory)
    last = pgd(trained_cas, x, y, keep="last", generator=gen(), **kw)
    best, info = pgd(trained_cas, x, y, keep="best", generator=gen(), return_info=True, **kw)
    fooled_last, fooled_best = fooled(trained_cas, last, y), fooled(trained_cas, best, y)
    # exactly, per example: whatever the last iterate fools, the returned iterate fools too
    assert bool((fooled_best | ~fooled_last).all())
    assert fooled_best.sum() >= fooled_last.sum()
    # the attack's own scoring is the deployed model's
    assert torch.equal(info.fooled, fooled_best)
    assert bool((info.fooled_any == fooled_best).all())
    assert bool((info.fooled_last | ~fooled_last).all())  # with restarts: the last iterate of some restart
    assert bool(((info.first_fooled >= 0) == info.fooled_any).all())
    # both stay in the threat model
    for x_adv in (last, best):
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        if kw.get("norm") == "l2":
            assert (x_adv - x).flatten(1).norm(dim=1).max() <= kw["eps"] + 1e-5
        else:
            assert (x_adv - x).abs().max() <= kw["eps"] + 1e-6


class Window(nn.Module):
    """The wrong class wins only while the mean pixel s lies in a narrow window around 0.53; a third logit, s - 100
    (never the argmax), gives an objective that raises s steadily, through the window and past it."""

    def forward(self, x):
        s = x.flatten(1).mean(dim=1)
        wrong = 1.0 - 1e4 * (s - 0.53) ** 2  # > 0.5 (the true class's logit) only for |s - 0.53| < 0.007
        return torch.stack([torch.full_like(s, 0.5), wrong, s - 100.0], dim=1)


def test_best_iterate_keeps_the_step_that_the_last_one_undoes():
    model = Window()
    x, y = torch.full((4, 3, 4, 4), 0.5), torch.zeros(4, dtype=torch.long)
    kw = dict(eps=0.1, alpha=0.01, steps=8, objective=lambda inp: inp.logits[:, 2], random_start=False)
    last = pgd(model, x, y, keep="last", **kw)  # s = 0.58: past the window, correct again
    best, info = pgd(model, x, y, keep="best", return_info=True, **kw)  # s = 0.53: inside it
    with torch.no_grad():
        assert bool((model(last).argmax(1) == y).all())
        assert bool((model(best).argmax(1) != y).all())
    assert best.flatten(1).mean(dim=1).sub(0.53).abs().max() < 1e-4
    assert info.fooled.all() and not info.fooled_last.any() and info.first_fooled.tolist() == [3] * 4
    # with keep="last" the info still reports what the attack passed through
    _, info_last = pgd(model, x, y, keep="last", return_info=True, **kw)
    assert not info_last.fooled.any() and info_last.fooled_any.all()


def test_best_iterate_prefers_the_later_iterate_when_the_margin_is_flat():
    """A model whose logits ignore the input: every iterate has the same margin, so "best" is the last iterate (the
    fixed-routing attack on the routing trap relies on this)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x, y = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(4, dtype=torch.long)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(pgd(model, x, y, eps=0.05, steps=3, keep="best", generator=gen()),
                       pgd(model, x, y, eps=0.05, steps=3, keep="last", generator=gen()))


def test_restarts_keep_the_worst_over_restarts(trained_cas):
    x, y = make_data(96, 12)
    kw = dict(eps=0.04, steps=4, objective="cas")
    single = pgd(trained_cas, x, y, generator=torch.Generator().manual_seed(0), **kw)
    multi, info = pgd(trained_cas, x, y, restarts=3, generator=torch.Generator().manual_seed(0), return_info=True,
                      **kw)
    fooled_multi = fooled(trained_cas, multi, y)
    assert torch.equal(fooled_multi, info.fooled) and torch.equal(info.fooled, info.fooled_any)
    # the first restart is the single run (same generator, same first start): whatever it fools, the restarts fool
    assert bool((fooled_multi | ~fooled(trained_cas, single, y)).all())
    assert int(info.first_fooled.max()) < 3 * (4 + 1)


# -- models whose logits depend on their auxiliary logits ------------------------------------------------------------
class AuxResidual(nn.Module):
    """Final logits = the CAS net's logits + 0.5 * its last auxiliary logits: the logits depend differentiably on the
    auxiliary logits (the output-gradient rescaling used to backward through the graph twice here)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.5 * casify.aux_logits(self.inner)[-1]


def _true_input_grad(model, x, y, objective, routing=None):
    fn, _ = get_objective(objective)
    x_in = x.clone().requires_grad_(True)
    with attack_context(model, routing), torch.enable_grad():
        logits = model(x_in)
        loss = fn(ObjectiveInput(logits, casify.aux_logits(model), y))
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
    return grad


@pytest.mark.parametrize("objective", ["ce", "cas", "cw_cas", "aux:1"])
@pytest.mark.parametrize("routing", [None, "straight-through"])
def test_logits_that_depend_on_aux_logits_get_the_exact_gradient(objective, routing):
    torch.manual_seed(0)
    model = AuxResidual(cas_net(3)).eval()
    x, y = make_data(16, 13)
    fn, _ = get_objective(objective)
    x_in = x.clone().requires_grad_(True)
    with attack_context(model, routing), torch.enable_grad():
        outputs = [model(x_in).float()] + [a.float() for a in casify.aux_logits(model)]
        _, grads = attacks.output_grads(fn, outputs, dict(y=y))
        direction = attacks.input_grad_direction(outputs, grads, x_in, low_precision=False)
    true = _true_input_grad(model, x, y, objective, routing)

    def unit(g):
        return g.flatten(1) / g.flatten(1).abs().amax(dim=1, keepdim=True)

    assert bool((true.flatten(1).abs().amax(dim=1) > 0).all())
    # up to a positive scale per example, the attack's direction is the true gradient: every path counted once
    torch.testing.assert_close(unit(direction), unit(true), rtol=0, atol=1e-5)
    x_adv = pgd(model, x, y, eps=0.01, steps=2, objective=objective, routing=routing)  # and the attack runs
    assert (x_adv - x).abs().max() <= 0.01 + 1e-6


def test_logits_that_depend_on_aux_logits_in_bfloat16():
    torch.manual_seed(0)
    model = AuxResidual(cas_net(3)).eval()
    x, y = make_data(16, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for routing in (None, "straight-through"):
            x_adv = pgd(model, x, y, eps=8 / 255, steps=2, objective="cas", random_start=False, routing=routing)
            assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
            assert bool(((x_adv - x).flatten(1).abs().amax(dim=1) > 0).all())


# -- straight-through routing ----------------------------------------------------------------------------------------
def routing_flip(margin: float = 0.04):
    """A CAS model with three classes whose predicted class's weight row is all zeros, so its logits are the constant
    fc bias and every final-logit gradient is exactly zero; a coherent brightening of the input by 4/255 flips the
    module's argmax to class 1, whose row passes the features to a head that then predicts class 1. Uniform noise of
    8/255 moves the mean pixel by ~1e-3 of that and never flips it. Inputs: :func:`flip_inputs`, label 0."""

    from conftest import RoutingTrap

    torch.manual_seed(0)
    model = casify.wrap(RoutingTrap(), layers=["relu"], input_size=(3, 8, 8), normalize=None)
    (module,) = casify.find_cas_modules(model)
    with torch.no_grad():
        model.conv.weight.fill_(0.25)  # every channel: 0.25 * (r + g + b) = 0.375 at mid grey; pooled sum 1.5
        model.conv.bias.zero_()
        module.classifier.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4, [-1.0] * 4]))
        module.classifier.bias.copy_(torch.tensor([1.5 + margin, 0.0, 0.0]))  # class 0 by `margin` at mid grey
        model.fc.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4, [0.0] * 4]))
        model.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    return model.eval()


def flip_inputs(n: int = 16):
    """Mid grey plus a zero-mean checkerboard of +-0.05 (every example's mean pixel is exactly 0.5); label 0."""
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1.0
    x = 0.5 + 0.05 * board.expand(n, 3, 8, 8) * torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)
    return x.contiguous(), torch.zeros(n, dtype=torch.long)


def test_straight_through_forward_is_the_deployed_forward(trained_cas):
    x, _ = make_data(32, 14)
    with attack_context(trained_cas):
        deployed = trained_cas(x)
    with attack_context(trained_cas, "straight-through"):
        straight = trained_cas(x)
    assert torch.equal(straight, deployed)
    assert all("_routing_for" not in m.__dict__ for m in casify.find_cas_modules(trained_cas))


def test_straight_through_reaches_the_gradient_that_argmax_blocks():
    model = routing_flip()
    x, y = flip_inputs()
    with torch.no_grad(), casify.route(model, labels=None):
        assert bool((model(x).argmax(1) == 0).all())
    assert bool((_true_input_grad(model, x, y, "ce") == 0).all())  # argmax routing: row 0 masks everything
    grad = _true_input_grad(model, x, y, "ce", routing="straight-through")
    assert bool((grad.flatten(1).abs().amax(dim=1) > 0).all())
    # so final-logit PGD cannot move the prediction, while the same PGD through the straight-through routing flips it
    kw = dict(eps=8 / 255, steps=10, objective="ce", generator=torch.Generator().manual_seed(0))
    assert not fooled(model, pgd(model, x, y, **kw), y).any()
    kw["generator"] = torch.Generator().manual_seed(0)
    assert fooled(model, pgd(model, x, y, routing="straight-through", **kw), y).all()
    # and the auxiliary-aware objective flips it without any routing trick
    kw["generator"] = torch.Generator().manual_seed(0)
    assert fooled(model, pgd(model, x, y, **{**kw, "objective": "cas"}), y).all()
    assert all("_routing_for" not in m.__dict__ for m in casify.find_cas_modules(model))


def test_straight_through_needs_cas_modules():
    x, y = make_data(4, 0)
    with pytest.raises(ValueError, match="no CAS modules"):
        pgd(SmallConvNet(NUM_CLASSES).eval(), x, y, steps=1, routing="straight-through")
    with pytest.raises(ValueError, match="routing"):
        Attack(routing="sideways")


def test_clean_routings_are_resolved_by_the_attack(trained_cas):
    x, y = make_data(32, 15)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for kind in ("clean-predicted", "clean-soft"):
        fixed = attacks.clean_routing(trained_cas, x, kind)
        a = pgd(trained_cas, x, y, eps=0.05, steps=3, objective="cas", routing=kind, generator=gen())
        b = pgd(trained_cas, x, y, eps=0.05, steps=3, objective="cas", routing=fixed, generator=gen())
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="clean input"):
        with attack_context(trained_cas, "clean-soft"):
            pass


# -- the adaptive CW objectives --------------------------------------------------------------------------------------
def test_cw_objectives_see_the_auxiliary_heads(trained_cas):
    x, y = make_data(32, 16)
    with torch.no_grad(), casify.route(trained_cas, labels=None):
        logits = trained_cas(x)
        aux = casify.aux_logits(trained_cas)
    inp = ObjectiveInput(logits, aux, y, beta=2.0, kappa=50.0)
    margin = attacks.cw_margin
    heads = torch.stack([margin(a, y).clamp(max=50.0) for a in aux]).mean(0)
    expected = margin(logits, y).clamp(max=50.0) + 2.0 * heads
    assert torch.allclose(get_objective("cw_cas")[0](inp), expected)
    assert torch.allclose(get_objective("cw_aux:1")[0](inp), margin(aux[1], y).clamp(max=50.0))
    assert torch.allclose(get_objective("cw_cas")[0](ObjectiveInput(logits, [], y)), get_objective("cw")[0](
        ObjectiveInput(logits, [], y)))  # no heads: the plain CW margin
    assert Attack(kind="cw").objective == "cw" and Attack(kind="cw", objective="cas").objective == "cw_cas"
    assert Attack(kind="cw", objective="aux:0").objective == "cw_aux:0"
    assert attacks.get_attack("cw20").objective == "cw_cas"
    # cw_inf is adaptive by default on a CAS model, and equals the plain CW-inf on a model without CAS modules
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not torch.equal(cw_inf(trained_cas, x, y, steps=3, generator=gen()),
                           cw_inf(trained_cas, x, y, steps=3, objective="cw", generator=gen()))
    plain = SmallConvNet(NUM_CLASSES).eval()
    assert torch.equal(cw_inf(plain, x, y, steps=3, generator=gen()),
                       cw_inf(plain, x, y, steps=3, objective="cw", generator=gen()))
    with pytest.raises(ValueError, match="cw_inf objective"):
        cw_inf(plain, x, y, steps=1, objective="ce")


def test_objective_tags_name_what_an_attack_sees():
    assert attacks.objective_tag("cas") == attacks.objective_tag("cw_cas") == attacks.objective_tag("cas_kl") == "cas"
    assert attacks.objective_tag("ce") == attacks.objective_tag("cw") == "final-logits"
    assert attacks.objective_tag("aux:1") == attacks.objective_tag("cw_aux:1") == "aux:1"
    assert not Attack(objective="ce").sees_aux and Attack(objective="ce", routing="straight-through").sees_aux
    assert Attack(objective="cas").sees_aux and Attack(kind="cw", objective="aux:0").sees_aux


def test_training_presets_keep_the_last_iterate_and_evaluation_presets_the_best():
    assert {name: a.keep for name, a in attacks.PRESETS.items()} == {
        "pgd20": "best", "fgsm": "best", "cw20": "best", "pgd20-st": "best",
        "at-train": "last", "trades-train": "last", "mart-train": "last"}
    assert attacks.PRESETS["pgd20-st"].routing == "straight-through"
    with pytest.raises(ValueError, match="keep"):
        pgd(SmallConvNet(NUM_CLASSES).eval(), *make_data(2, 0), steps=1, keep="first")


def test_fgsm_best_iterate_includes_the_random_start(trained_cas):
    x, y = make_data(96, 17)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    last = fgsm(trained_cas, x, y, eps=0.08, random_start=True, objective="cas", keep="last", generator=gen())
    best = fgsm(trained_cas, x, y, eps=0.08, random_start=True, objective="cas", generator=gen())
    assert bool((fooled(trained_cas, best, y) | ~fooled(trained_cas, last, y)).all())
