"""The common tests every registered defense passes (PEFT's common-tester pattern): a defense registered later gets
them by registering. Plus each defense's forward against a hand computation of its paper's equations."""
import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import casify
from casify.analysis.capture import channel_activations
import casify.defenses
from casify.defenses import DEFENSES, CIFSModule, DefenseModule, FSRModule, register_defense
from casify.defenses.fsr import GUMBEL_EPS
from casify.core.discovery import LayerError
from casify.losses import get_loss

from conftest import ChannelsLast, TinyNet

ALL = sorted(DEFENSES)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# (what, builder, layers, input size, layout)
MODELS = [
    ("timm cifar_resnet18", lambda: timm.create_model("cifar_resnet18", num_classes=10, width=0.125),
     ["layer4.0", "layer4.1"], (3, 32, 32), "channels-first"),
    ("torchvision resnet18", lambda: torchvision.models.resnet18(num_classes=10), ["layer3"], (3, 32, 32),
     "channels-first"),
    ("channels-last net", ChannelsLast, ["norm"], (3, 16, 16), "channels-last"),
    ("timm vit tokens", lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=2),
     ["blocks.1"], (3, 32, 32), "tokens"),
    ("mlp head features", lambda: torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 10)), ["4"], (3, 8, 8), "features"),
]


def _routed(model, labels):
    """casify.route for routed defenses; nothing for the others (they refuse a route)."""
    import contextlib
    return casify.route(model, labels=labels) if casify.defenses.routed_modules(model) else contextlib.nullcontext()


def _wrap(defense, model=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("init", "paper")
    return casify.wrap(model or TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None, defense=defense,
                       **kw)


@pytest.mark.parametrize("defense", ALL)
@pytest.mark.parametrize("what,build,layers,size,layout", MODELS, ids=[m[0] for m in MODELS])
def test_wraps_each_model_and_layout_it_allows(defense, what, build, layers, size, layout):
    cls = DEFENSES[defense]
    torch.manual_seed(0)
    if layout not in cls.layouts:
        with pytest.raises(LayerError, match="works on"):
            casify.wrap(build(), layers=layers, input_size=size, defense=defense)
        return
    model = casify.wrap(build(), layers=layers, input_size=size, defense=defense)
    modules = casify.find_cas_modules(model)
    assert len(modules) == len(layers) and all(type(m) is cls for m in modules)
    x = torch.rand(2, *size)
    for training in (False, True):
        model.train(training)
        with _routed(model, torch.tensor([0, 1])):
            out = model(x)
        assert out.shape[0] == 2 and torch.isfinite(out).all()
        assert len(casify.aux_logits(model)) == len(layers) * len(cls.head_names)
    assert model.casify_config["defense"]["name"] == defense


@pytest.mark.parametrize("defense", ALL)
def test_routing_in_training_and_at_test(defense):
    model = _wrap(defense)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 5
    model.train()
    if DEFENSES[defense].routed:
        with pytest.warns(casify.CASRoutingWarning):
            model(x)
        torch.manual_seed(1)
        with casify.route(model, labels=y):
            by_label = model(x)
        torch.manual_seed(1)
        with casify.route(model, labels=(y + 1) % 5):
            by_other = model(x)
        assert not torch.allclose(by_label, by_other), "a routed defense's output must depend on the routed class"
    model.eval()
    with torch.no_grad():
        with _routed(model, None):
            predicted = model(x)
        deployed = model(x)
    assert torch.equal(predicted, deployed)
    if not DEFENSES[defense].routed:
        with pytest.raises(ValueError, match="route by nothing"):
            with casify.route(model, labels=y):
                pass


@pytest.mark.parametrize("defense", ALL)
def test_exact_save_load_round_trip(defense, tmp_path):
    model = _wrap(defense).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["config_version"] == 2 and saved["defense"]["name"] == defense
    loaded = casify.from_pretrained(tmp_path / "m", model=TinyNet()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert loaded.casify_config["defense"] == model.casify_config["defense"]


@pytest.mark.parametrize("defense", ALL)
def test_deepcopy_and_model_ema(defense):
    from timm.utils import ModelEmaV3
    model = _wrap(defense)
    model.train()
    with _routed(model, torch.arange(4)):
        model(torch.rand(4, 3, 8, 8)).sum().backward()  # leaves non-leaf aux logits on the modules
    copied = copy.deepcopy(model)
    assert all(h is None for m in casify.find_cas_modules(copied) for h in m.aux_outputs())
    ema = ModelEmaV3(model, decay=0.9)
    ema.update(model)
    x = torch.rand(3, 3, 8, 8)
    model.eval(), copied.eval(), ema.module.eval()
    with torch.no_grad():
        assert torch.equal(model(x), copied(x))
        assert ema.module(x).shape == (3, 5)


@pytest.mark.parametrize("defense", ALL)
def test_compiles_without_graph_breaks(defense):
    import torch._dynamo as dynamo
    model = _wrap(defense).eval()
    dynamo.reset()
    explained = dynamo.explain(model)(torch.rand(2, 3, 8, 8))
    assert explained.graph_break_count == 0, explained.break_reasons


def _separable(n=240, seed=0):
    """Four classes told apart by a large colour offset (a fixture trained to a wide margin, whatever the CPU)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.25 * torch.rand(n, 3, 8, 8, generator=g)
    offsets = torch.tensor([[0.6, 0, 0], [0, 0.6, 0], [0, 0, 0.6], [0.6, 0.6, 0.6]])
    return (x + offsets[y][:, :, None, None]).clamp(0, 1), y


def _trained(defense):
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(num_classes=4), layers=["block"], input_size=(3, 8, 8), normalize=None,
                        defense=defense, init="paper")
    x, y = _separable()
    loss_fn = get_loss("standard", cas=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        idx = torch.randint(0, len(x), (48,), generator=g)
        loss, _ = loss_fn(model, x[idx], x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize("defense", ALL)
def test_pgd_lowers_accuracy_and_adaptive_rows_are_at_least_as_strong(defense):
    from casify.evaluate import evaluate
    model, x, y = _trained(defense)
    x, y = x[:64], y[:64]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean >= 0.9
    # The classes are 0.6 apart (L-inf), so eps 0.3 sits at the midpoint, where whether a whole class falls to one
    # attack and holds against another is decided by float rounding (a machine-dependent tie, e.g. FSR's 0.25 against
    # 0.25). So the union at eps is held against final-logit PGD in a smaller ball (eps 0.25, well inside the
    # margin), a weaker threat: final-logit PGD already fools most of three classes there, and the union must fool
    # every example it fools, with no tolerance.
    eps, smaller = 0.3, 0.25
    x_final = casify.attacks.pgd(model, x, y, eps=smaller, steps=10, objective="ce")
    with torch.no_grad():
        fooled_by_final = model(x_final).argmax(1) != y
    final = 1 - fooled_by_final.float().mean().item()
    assert final < clean
    straight = casify.attacks.Attack(name="pgd20", eps=eps, steps=20, objective="cas", routing="straight-through")
    report = evaluate(model, torch.utils.data.TensorDataset(x, y), attacks=["pgd20", "adaptive", straight], eps=eps,
                      seed=0,
                      progress=False, checks=False, per_attack=True)
    adaptive = [r for r in report.attacks if r.name.startswith(("pgd20[cas", "pgd20[aux"))]
    assert any("straight-through" in r.name for r in adaptive)
    assert report.worst_case["accuracy"] <= final  # the adaptive union is no weaker than final-logit PGD
    missed = [i for i, (f, s) in enumerate(zip(fooled_by_final.tolist(), report.per_example["worst_case"])) if f and s]
    assert not missed, f"examples final-logit PGD fools in the smaller ball that the union at eps missed: {missed}"


@pytest.mark.parametrize("defense", ALL)
def test_hostile_configs_are_refused(defense, tmp_path):
    model = _wrap(defense)
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    good = json.loads(path.read_text())
    bad_values = {"defense": [{"name": "../evil", "options": {}}, {"name": defense, "options": {"no_such": 1}},
                              {"name": defense, "options": {}, "code": "import os"}, "cas"]}
    for key, spec in DEFENSES[defense].OPTIONS.items():
        for value in (10 ** 12, "x; rm -rf /", None, [1] * 3):
            if not spec.check(value):
                bad_values["defense"].append({"name": defense, "options": {key: value}})
    for bad in bad_values["defense"]:
        path.write_text(json.dumps({**good, "defense": bad}))
        with pytest.raises(casify.LoadError, match="defense"):
            casify.from_pretrained(tmp_path / "m", model=TinyNet())
    with pytest.raises(ValueError, match="no option"):
        _wrap(defense, no_such_option=1)


@pytest.mark.parametrize("defense", ALL)
def test_channel_analysis_captures_before_and_after_the_defense(defense):
    model = _wrap(defense).eval()
    x = torch.rand(5, 3, 8, 8)
    before = channel_activations(model, x, "block", cas_side="before")
    after = channel_activations(model, x, "block", cas_side="after")
    assert before.shape == after.shape == (5, 16)


def test_a_defense_registered_later_is_wrapped_saved_and_loaded(tmp_path):
    @register_defense
    class Halve(DefenseModule):
        """Scales the activation by a learned per-channel gate; one auxiliary head (a test-only defense)."""
        name = "halve_for_tests"
        layouts = ("channels-first",)

        def __init__(self, num_channels, num_classes, channel_dim=1, ndim=4, init="identity", device=None,
                     dtype=None):
            super().__init__()
            self.num_channels, self.num_classes = num_channels, num_classes
            self.gate = nn.Parameter(torch.full((num_channels,), 0.5))
            self.classifier = nn.Linear(num_channels, num_classes)
            self.last = None

        def forward(self, f):
            self.last = self.classifier(f.mean(dim=(2, 3)))
            return f * self.gate[:, None, None]

        def aux_outputs(self):
            return [self.last]

    try:
        model = _wrap("halve_for_tests", init="identity").eval()
        x = torch.rand(2, 3, 8, 8)
        with torch.no_grad():
            expected = model(x)
        model.save_pretrained(tmp_path / "m")
        with torch.no_grad():
            assert torch.equal(casify.from_pretrained(tmp_path / "m", model=TinyNet()).eval()(x), expected)
        loss, _ = get_loss("at", cas=True)(model.train(), x, x, torch.tensor([0, 1]))
        assert torch.isfinite(loss)
    finally:
        DEFENSES.pop("halve_for_tests")


# -- each defense against its paper's equations, by hand ---------------------------------------------------------
def _module_io(model, x, labels=None):
    """The defense module's input and output on one forward of ``model``."""
    module = casify.find_cas_modules(model)[0]
    seen = {}
    h = module.register_forward_hook(lambda m, args, out: seen.update(f=args[0], out=out))
    with _routed(model, labels):
        model(x)
    h.remove()
    return module, seen["f"], seen["out"]


@pytest.mark.parametrize("probe", ["linear", "mlp"])
@pytest.mark.parametrize("training", [True, False])
def test_cifs_forward_matches_the_authors_gradient_mask(probe, training):
    """mask = softmax_c( sum over positions of d(z_k1 + z_k2)/d f ), f detached, z the probe on f; k1 the label in
    training and the top class at test, k2 the probe's second class (HanshuYAN/CIFS, resnet_CIFS.py)."""
    model = _wrap("cifs", probe=probe)
    model.train(training)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 5
    module, f, out = _module_io(model, x, labels=y if training else None)
    feat = f.detach().clone().requires_grad_(True)
    pooled = feat.mean(dim=(2, 3))
    if probe == "mlp":
        pooled = F.softplus(module.hidden_layer(pooled), beta=5)
    z = module.classifier(pooled)
    top = z.topk(2, dim=1).indices
    k1 = y if training else top[:, 0]
    target = z[torch.arange(6), k1].sum() + z[torch.arange(6), top[:, 1]].sum()
    grad, = torch.autograd.grad(target, feat)
    mask = F.softmax(grad.mean(dim=(2, 3)) * grad.shape[2] * grad.shape[3], dim=1)
    torch.testing.assert_close(out, f * mask[:, :, None, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.aux_outputs()[0], module.classifier(
        F.softplus(module.hidden_layer(f.mean(dim=(2, 3))), beta=5) if probe == "mlp" else f.mean(dim=(2, 3))))


def test_cifs_identity_init_passes_the_activation_through():
    model = _wrap("cifs", init="identity", mask_scale="channels").eval()
    _, f, out = _module_io(model, torch.rand(3, 3, 8, 8))
    torch.testing.assert_close(out, f)
    with pytest.raises(ValueError, match="mask_scale='channels'"):
        CIFSModule(8, 5, init="identity")


@pytest.mark.parametrize("training", [True, False])
def test_fsr_forward_matches_the_papers_equations(training):
    """m = Gumbel-sigmoid(sigmoid(sep(f)), tau) (u ~ U(0, 1) in training, u = 1/2 at test); r = f m, nr = f (1 - m),
    rec = nr + rec_net(nr) (1 - m); out = r + rec; one shared head on pooled r, nr, rec (wkim97/FSR)."""
    model = _wrap("fsr")
    model.train(training)
    x = torch.rand(4, 3, 8, 8)
    module = casify.find_cas_modules(model)[0]
    seen = {}
    h = module.register_forward_hook(lambda m, args, out: seen.update(f=args[0], out=out))
    torch.manual_seed(7)
    model(x)
    h.remove()
    f, out = seen["f"], seen["out"]
    p, tau = GUMBEL_EPS, module.tau
    s = torch.sigmoid(module.separation(f))
    if training:  # TinyNet draws nothing before the module (its dropout comes after): replay the module's draws
        torch.manual_seed(7)
        u1, u2 = torch.rand_like(s), torch.rand_like(s)
    else:
        u1 = u2 = torch.full_like(s, 0.5)
    g1, g2 = -torch.log(-torch.log(u1 + p) + p), -torch.log(-torch.log(u2 + p) + p)
    m = torch.sigmoid(((torch.log(s + p) + g1) - (torch.log(1 - s + p) + g2)) / (tau + p))
    r, nr = f * m, f * (1 - m)
    rec = nr + module.recalibration(nr) * (1 - m)
    torch.testing.assert_close(out, r + rec, rtol=1e-5, atol=1e-6)
    heads = [module.classifier(t.mean(dim=(2, 3))) for t in (r, nr, rec)]
    for got, want in zip(module.aux_outputs(), heads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fsr_targets_weights_and_identity_init():
    module = FSRModule(8, 5, sep_weight=0.5, rec_weight=2.0)
    final = torch.tensor([[3.0, 2.0, 0, 0, 0], [0, 1.0, 4.0, 0, 0]])
    y = torch.tensor([0, 1])
    targets = module.aux_targets(y, final)
    assert targets[0].tolist() == [0, 1] and targets[1].tolist() == [1, 2] and targets[2].tolist() == [0, 1]
    assert module.aux_weights == [0.5, 0.5, 2.0]
    model = _wrap("fsr", init="identity").eval()
    _, f, out = _module_io(model, torch.rand(3, 3, 8, 8))
    torch.testing.assert_close(out, f)


@pytest.mark.parametrize("defense,options", [("cifs", {"probe": "mlp"}), ("fsr", {})])
def test_adaptive_backward_keeps_the_forward_and_changes_the_gradient(defense, options):
    """The BPDA switch of a defense with a detached (CIFS) or saturating (FSR) step: the deployed values stay, the
    input gradient changes; copies start with it off."""
    model = _wrap(defense, **options).eval()
    module = casify.find_cas_modules(model)[0]
    x = torch.rand(4, 3, 8, 8, requires_grad=True)

    def forward_and_grad():
        out = model(x)
        grad, = torch.autograd.grad(out[:, 0].sum(), x)
        return out.detach(), grad
    plain_out, plain_grad = forward_and_grad()
    assert module.set_adaptive_backward(True) is False
    adaptive_out, adaptive_grad = forward_and_grad()
    assert copy.deepcopy(module).adaptive is False
    module.set_adaptive_backward(False)
    torch.testing.assert_close(adaptive_out, plain_out)
    assert not torch.allclose(adaptive_grad, plain_grad)


@pytest.mark.parametrize("defense,options", [("cas", {}), ("cifs", {"top_k": 1, "probe": "mlp", "hidden": 7}),
                                             ("fsr", {"tau": 0.5, "hidden": 5, "sep_weight": 2.0})])
def test_non_default_options_and_suppress_round_trip(defense, options, tmp_path):
    kw = {"suppress": False} if defense == "cas" else {}
    model = _wrap(defense, **options, **kw).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = casify.from_pretrained(tmp_path / "m", model=TinyNet()).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    module = casify.find_cas_modules(loaded)[0]
    assert {k: getattr(module, k) for k in options} == options
    if defense == "cas":
        assert module.suppress is False and loaded.casify_config["defense"]["options"] == {}
        with pytest.raises(ValueError, match="no option 'suppress'"):  # one place for it: DefenseConfig.suppress
            casify.wrap(TinyNet(), casify.DefenseConfig(layers=["block"], input_size=(3, 8, 8), normalize=None,
                                                    defense_options={"suppress": False}))


def test_configs_that_casify_never_writes_are_refused(tmp_path):
    _wrap("fsr").save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    good = json.loads(path.read_text())
    for bad in ({**good, "config_version": 1},  # a v1 file with a defense section: not written by casify
                {**good, "defense": {"name": "fsr", "options": []}},
                {**good, "defense": {"name": "fsr", "options": 0}},
                {**good, "cas": {**good["cas"], "suppress": False}}):  # suppress=False is CAS's alone
        path.write_text(json.dumps(bad))
        with pytest.raises(casify.LoadError):
            casify.from_pretrained(tmp_path / "m", model=TinyNet())


def test_routing_an_unrouted_defense_is_refused_clearly():
    from casify.core.routing import train_route
    model = _wrap("fsr")
    with pytest.raises(ValueError, match="route by nothing"):
        with casify.route(model, labels=torch.arange(2)):
            pass
    with pytest.raises(ValueError, match="train_routing='soft' needs a routed defense"):
        with train_route(model, torch.arange(2), "soft"):
            pass
    with pytest.raises(ValueError, match="routed defense modules"):
        casify.attacks.pgd(model, torch.rand(2, 3, 8, 8), torch.arange(2), steps=1, routing="clean-predicted")
    loss, _ = get_loss("at", cas=True)(model.train(), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.arange(2))
    assert torch.isfinite(loss)  # the label routing of the losses is a no-op on an unrouted defense


def test_per_layer_options_build_cifs_as_its_authors_did(tmp_path):
    """CIFS's authors put an MLP probe on layer4.0 and a linear one on layer4.1: per-layer options over the defense's
    own, saved and loaded as data; a key that names no wrapped layer, or a bad option, is refused."""
    torch.manual_seed(0)
    layers = ["block.0", "block.2"]
    model = casify.wrap(TinyNet(), layers=layers, input_size=(3, 8, 8), normalize=None, defense="cifs",
                        probe="linear", layer_options={"block.0": {"probe": "mlp", "hidden": 6}}).eval()
    probes = [(m.probe, m.hidden) for m in casify.find_cas_modules(model)]
    assert probes == [("mlp", 6), ("linear", 128)]
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["defense"]
    assert saved["layer_options"] == {"block.0": {"probe": "mlp", "hidden": 6}} and saved["options"]["probe"] == "linear"
    loaded = casify.from_pretrained(tmp_path / "m", model=TinyNet()).eval()
    assert [(m.probe, m.hidden) for m in casify.find_cas_modules(loaded)] == probes
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # an empty override is the layer's default: accepted, and not written
    empty = casify.wrap(TinyNet(), layers=["block.0"], input_size=(3, 8, 8), normalize=None, defense="cifs",
                        layer_options={"block.0": {}})
    empty.save_pretrained(tmp_path / "empty")
    assert "layer_options" not in json.loads((tmp_path / "empty" / "config.json").read_text())["defense"]
    # without per-layer options the config is written as before (older readers and folders unchanged)
    plain = _wrap("cifs")
    plain.save_pretrained(tmp_path / "plain")
    assert "layer_options" not in json.loads((tmp_path / "plain" / "config.json").read_text())["defense"]
    with pytest.raises(LayerError, match="not among the wrapped layers"):
        casify.wrap(TinyNet(), layers=["block.0"], input_size=(3, 8, 8), normalize=None, defense="cifs",
                    layer_options={"block.2": {"probe": "mlp"}})
    with pytest.raises(ValueError, match="probe"):
        casify.wrap(TinyNet(), layers=["block.0"], input_size=(3, 8, 8), normalize=None, defense="cifs",
                    layer_options={"block.0": {"probe": "deep"}})
    path = tmp_path / "m" / "config.json"
    good = json.loads(path.read_text())
    for bad in ({"block.9": {"probe": "mlp"}}, {"block.0": {"probe": "deep"}}, {"block.0": []}, {"block.0": {}}):
        path.write_text(json.dumps({**good, "defense": {**good["defense"], "layer_options": bad}}))
        with pytest.raises(casify.LoadError):
            casify.from_pretrained(tmp_path / "m", model=TinyNet())
