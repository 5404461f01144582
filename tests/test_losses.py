"""AT / TRADES / MART with and without CAS: values against hand computations, routing, settings and the registry."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import casify
from conftest import SmallConvNet, separable_data
from casify.losses import ATLoss, MARTLoss, TRADESLoss, get_loss, main_logits

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5
BETA = 2.0


def make_data(n: int, seed: int):
    return separable_data(n, seed, NUM_CLASSES)


def fit(model, steps: int = 15):
    """A few steps of training, so that outputs depend on the input and the KL terms are far from zero."""
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for i in range(steps):
        x, y = make_data(32, 100 + i)
        loss, _ = ATLoss(cas=bool(casify.find_cas_modules(model)))(model, None, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


@pytest.fixture
def cas_model():
    torch.manual_seed(0)
    model = casify.wrap(SmallConvNet(NUM_CLASSES), layers=["relu2", "relu3"], input_size=(3, 8, 8), normalize=None)
    return fit(model.train())


@pytest.fixture
def plain_model():
    torch.manual_seed(0)
    return fit(SmallConvNet(NUM_CLASSES).train())


@pytest.fixture
def batch():
    x, y = make_data(12, 0)
    g = torch.Generator().manual_seed(1)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.2).clamp(0, 1)  # large, so the KL terms matter
    return x, x_adv, y


def routed(model, x, y):
    """Training-mode outputs routed by y, computed independently of casify.losses."""
    if not casify.find_cas_modules(model):
        return model(x), []
    with casify.route(model, labels=y):
        return model(x), list(casify.aux_logits(model))


def kl(p_logits, q_logits):
    """KL(p || q) per example, written out."""
    p = F.softmax(p_logits, 1)
    return (p * (F.log_softmax(p_logits, 1) - F.log_softmax(q_logits, 1))).sum(1)


def mart_terms(nat, adv, y, weight_logits):
    probs = F.softmax(adv, 1)
    wrong = probs.masked_fill(F.one_hot(y, NUM_CLASSES).bool(), -1.0).argmax(1)
    bce = F.cross_entropy(adv, y) - torch.log(1.0001 - probs.gather(1, wrong[:, None]).squeeze(1) + 1e-12).mean()
    p_nat = F.softmax(nat, 1)
    kl_terms = (p_nat * (torch.log(p_nat) - torch.log(probs + 1e-12))).sum(1)
    p_true = F.softmax(weight_logits, 1).gather(1, y[:, None]).squeeze(1)
    return bce, (kl_terms * (1.0000001 - p_true)).mean()


def test_at_matches_hand(cas_model, plain_model, batch):
    x, x_adv, y = batch
    for model, cas in ((plain_model, False), (cas_model, False), (cas_model, True)):
        loss, metrics = ATLoss(cas=cas)(model, x, x_adv, y)
        logits, aux = routed(model, x_adv, y)
        expected = F.cross_entropy(logits, y)
        if cas:
            expected = expected + BETA * torch.stack([F.cross_entropy(a, y) for a in aux]).mean()
        assert torch.allclose(loss, expected, atol=1e-6)
        assert torch.allclose(metrics["loss"], expected, atol=1e-6)
        assert ("aux_ce_adv" in metrics) == cas


@pytest.mark.parametrize("lambda_", [6.0, 4.0])
def test_trades_matches_hand(cas_model, plain_model, batch, lambda_):
    x, x_adv, y = batch
    for model, cas in ((plain_model, False), (cas_model, True)):
        loss, metrics = TRADESLoss(cas=cas, lambda_=lambda_)(model, x, x_adv, y)
        nat, nat_aux = routed(model, x, y)
        adv, adv_aux = routed(model, x_adv, y)
        natural = F.cross_entropy(nat, y)
        robust = kl(nat, adv).mean()
        if cas:
            natural = natural + BETA * torch.stack([F.cross_entropy(a, y) for a in nat_aux]).mean()
            robust = robust + BETA * torch.stack([kl(n, a).mean() for n, a in zip(nat_aux, adv_aux)]).mean()
        assert torch.allclose(loss, natural + lambda_ * robust, atol=1e-5)
        assert set(metrics) >= {"loss", "ce_nat", "kl", "acc_nat", "acc_adv"}


@pytest.mark.parametrize("aux_kl_weight", ["main", "aux"])
def test_mart_matches_hand(cas_model, plain_model, batch, aux_kl_weight):
    x, x_adv, y = batch
    lam = 5.0
    for model, cas in ((plain_model, False), (cas_model, True)):
        loss, _ = MARTLoss(cas=cas, lambda_=lam, aux_kl_weight=aux_kl_weight)(model, x, x_adv, y)
        nat, nat_aux = routed(model, x, y)
        adv, adv_aux = routed(model, x_adv, y)
        bce, rob = mart_terms(nat, adv, y, nat)
        expected = bce + lam * rob
        if cas:
            terms = [mart_terms(n, a, y, nat if aux_kl_weight == "main" else n) for n, a in zip(nat_aux, adv_aux)]
            aux_bce = torch.stack([t[0] for t in terms]).mean()
            aux_rob = torch.stack([t[1] for t in terms]).mean()
            expected = expected + BETA * aux_bce + BETA * lam * aux_rob
        assert torch.allclose(loss, expected, atol=1e-5)


def test_mart_quirk_flag_changes_the_loss(cas_model, batch):
    x, x_adv, y = batch
    authors, _ = MARTLoss(cas=True)(cas_model, x, x_adv, y)
    paper, _ = MARTLoss(cas=True, aux_kl_weight="aux")(cas_model, x, x_adv, y)
    assert MARTLoss().aux_kl_weight == "main"
    assert not torch.allclose(authors, paper)
    with pytest.raises(ValueError):
        MARTLoss(aux_kl_weight="other")


@pytest.mark.parametrize("name,forwards", [("at", 1), ("trades", 2), ("mart", 2)])
def test_loss_forwards_route_by_labels_in_training_mode(cas_model, batch, name, forwards):
    x, x_adv, y = batch
    seen = []
    modules = casify.find_cas_modules(cas_model)
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod.training, mod._route))) for m in modules]
    with warnings.catch_warnings():
        warnings.simplefilter("error", casify.CASRoutingWarning)
        get_loss(name, cas=True)(cas_model, x, x_adv, y)
    for h in hooks:
        h.remove()
    assert len(seen) == forwards * len(modules)
    assert all(training and r[0] == "labels" and torch.equal(r[1], y) for training, r in seen)
    assert all(m._route is None for m in modules)


def test_cas_gradients_reach_cas_parameters(cas_model, batch):
    x, x_adv, y = batch
    for name in ("at", "trades", "mart"):
        cas_model.zero_grad()
        loss, _ = get_loss(name, cas=True)(cas_model, x, x_adv, y)
        loss.backward()
        for m in casify.find_cas_modules(cas_model):
            assert m.classifier.weight.grad.abs().sum() > 0
            assert m.classifier.bias.grad.abs().sum() > 0


def test_cas_on_plain_model_is_an_error(plain_model, batch):
    x, x_adv, y = batch
    for name in ("at", "trades", "mart"):
        with pytest.raises(ValueError, match="CAS modules"):
            get_loss(name, cas=True)(plain_model, x, x_adv, y)


def test_clean_inputs_required(cas_model, batch):
    _, x_adv, y = batch
    ATLoss()(cas_model, None, x_adv, y)
    for loss in (TRADESLoss(), MARTLoss()):
        with pytest.raises(ValueError, match="x_nat"):
            loss(cas_model, None, x_adv, y)


def test_defaults_presets_and_config():
    assert get_loss("trades").lambda_ == 6.0
    assert get_loss("trades", defaults="authors").lambda_ == 4.0
    assert get_loss("mart").lambda_ == 6.0
    assert get_loss("mart", defaults="authors").lambda_ == 5.0
    assert get_loss("trades", defaults="authors", lambda_=1.0).lambda_ == 1.0
    assert get_loss("at", cas=True).beta == 2.0
    config = get_loss("TRADES", cas=True, defaults="authors").config()
    assert config == {"method": "trades", "cas": True, "beta": 2.0, "defaults": "authors", "lambda_": 4.0, "train_routing": "label",
                      "attack_objective": "cas_kl"}
    assert get_loss("mart", cas=True).config()["aux_kl_weight"] == "main"
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("fgsm")
    with pytest.raises(ValueError, match="defaults"):
        get_loss("at", defaults="mine")


def test_attack_objectives():
    assert get_loss("at").attack_objective == "ce"
    assert get_loss("at", cas=True).attack_objective == "cas"
    assert get_loss("mart").attack_objective == "ce"
    assert get_loss("mart", cas=True).attack_objective == "cas"
    assert get_loss("trades").attack_objective == "kl"
    assert get_loss("trades", cas=True).attack_objective == "cas_kl"
    attack = get_loss("trades", cas=True, beta=3.0).training_attack()
    assert (attack.objective, attack.beta, attack.steps, attack.random_start) == ("cas_kl", 3.0, 10, "normal")
    assert get_loss("at").training_attack(steps=3).to_dict()["steps"] == 3
    # FSR's authors craft training examples on the final logits' CE (their train.py): the attack's objective only
    fsr = get_loss("at", cas=True, beta=3.0, training_objective="ce")
    assert fsr.training_attack().objective == "ce" and fsr.attack_objective == "cas"
    assert fsr.config()["attack_objective"] == "ce" and fsr.config()["training_objective"] == "ce"
    with pytest.raises(ValueError, match="training_objective must be one of"):
        get_loss("at", training_objective="cee")


def test_loss_is_float32_under_bf16_autocast(cas_model, batch):
    x, x_adv, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("at", "trades", "mart"):
            loss, _ = get_loss(name, cas=True)(cas_model, x, x_adv, y)
            assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_main_logits_finds_the_final_head():
    import collections
    logits, aux = torch.randn(2, 3), torch.randn(2, 3)
    Outputs = collections.namedtuple("Outputs", ["logits", "aux_logits"])
    First = collections.namedtuple("First", ["scores", "aux"])
    assert main_logits(logits) is logits
    assert main_logits(Outputs(logits, aux)) is logits
    assert main_logits(Outputs(aux_logits=aux, logits=logits)) is logits
    assert main_logits(First(logits, aux)) is logits
    assert main_logits((logits, aux)) is logits and main_logits([logits]) is logits
    assert main_logits({"logits": logits, "aux": aux}) is logits
    with pytest.raises(TypeError, match="cannot find the logits"):
        main_logits({"scores": logits})
    with pytest.raises(TypeError, match="cannot find the logits"):
        main_logits(())
