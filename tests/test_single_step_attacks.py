"""The single-step training attacks (FGSM-RS, N-FGSM, FGSM without a random start): each paper's start, step and
projection, the training attack each method builds from them, and the bad inputs of ``train.attack``."""
import dataclasses

import pytest
import torch
from torch import nn

import casify
from casify import losses
from casify.attacks import Attack
from casify.evaluate import evaluate
from casify.train import TrainConfig

EPS = 8 / 255


def _model(seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))
    return casify.wrap(base, [], normalize=None, input_size=(3, 6, 6)).eval()


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 6, 6, generator=g), torch.arange(n) % 3


def _input_grad_sign(model, x, y):
    x = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0].sign()


def test_fgsm_rs_is_a_uniform_start_then_a_step_of_1_25_eps_projected_to_the_ball():
    model, (x, y) = _model(), _batch()
    attack = Attack(kind="fgsm_rs", eps="8/255", keep="last")
    assert attack.alpha == pytest.approx(1.25 * EPS) and attack.steps == 1 and attack.random_start == "uniform"
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    # the same computation written out: start uniform in the ball (from the same generator), one signed step, project
    start = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * EPS).clamp(0, 1)
    expected = torch.min(torch.max(start + 1.25 * EPS * _input_grad_sign(model, start, y), x - EPS), x + EPS)
    torch.testing.assert_close(x_adv, expected.clamp(0, 1), atol=1e-6, rtol=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_n_fgsm_adds_noise_of_2_eps_steps_eps_and_does_not_project_to_the_ball():
    model, (x, y) = _model(), _batch()
    attack = Attack(kind="n_fgsm", eps=EPS, keep="last")
    assert attack.alpha == pytest.approx(EPS) and attack.options == {"noise": 2.0, "clip": 0.0}
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    noisy = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 2 * EPS).clamp(0, 1)
    expected = (noisy + EPS * _input_grad_sign(model, noisy, y)).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)
    delta = (x_adv - x).abs()
    assert delta.max() > 2 * EPS and delta.max() <= 3 * EPS + 1e-6  # outside the eps-ball, by design
    # the authors' --clip option: project to clip * eps
    clipped = Attack(kind="n_fgsm", eps=EPS, keep="last", options={"clip": 1.0})(model, x, y)
    assert (clipped - x).abs().max() <= EPS + 1e-6
    # an accuracy under it would be measured outside the threat model: the evaluation refuses it
    with pytest.raises(ValueError, match="leaves the eps-ball by design"):
        evaluate(model, torch.utils.data.TensorDataset(x, y), attacks=[attack], eps=EPS, progress=False)


@pytest.mark.parametrize("method", ["at", "trades", "mart"])
@pytest.mark.parametrize("name,kind,start,alpha", [("fgsm", "fgsm", "none", 1.0), ("fgsm_rs", "fgsm_rs", "uniform", 1.25),
                                                   ("n_fgsm", "n_fgsm", "uniform", 1.0)])
def test_every_method_builds_each_single_step_training_attack_on_its_objective(method, name, kind, start, alpha):
    for cas in (False, True):
        loss = losses.get_loss(method, cas=cas)
        attack = loss.training_attack(name, eps=EPS, steps=1)
        assert (attack.kind, attack.random_start, attack.steps, attack.keep) == (kind, start, 1, "last")
        assert attack.objective == loss.attack_objective and attack.alpha == pytest.approx(alpha * EPS)
    with pytest.raises(ValueError, match="single-step attack; got steps=3"):
        loss.training_attack(name, eps=EPS, steps=3)


@pytest.mark.parametrize("kind", ["fgsm_rs", "n_fgsm"])
def test_on_a_defended_model_the_attack_reaches_the_auxiliary_heads(kind, one_thread):
    """The CAS arm: the single-step attack on the adaptive objective (CE + beta * mean aux CE) follows the auxiliary
    heads too, so its step differs from the one on the final logits alone."""
    import timm
    torch.manual_seed(0)
    model = casify.wrap(timm.create_model("cifar_resnet18", num_classes=3, width=0.125), ["layer4.1"], init="paper",
                        normalize=None, input_size=(3, 16, 16)).eval()
    x, y = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.arange(6) % 3
    adaptive = losses.get_loss("at", cas=True).training_attack(kind, eps=EPS, beta=50.0)
    plain = dataclasses.replace(adaptive, objective="ce")
    assert adaptive.sees_aux and not plain.sees_aux
    a = adaptive(model, x, y, generator=torch.Generator().manual_seed(3))
    b = plain(model, x, y, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a, b)


def test_train_attack_bad_inputs_and_identity():
    with pytest.raises(ValueError, match=r"train.attack 'nfgsm' is not a training attack; did you mean 'n_fgsm'\?"):
        TrainConfig(attack="nfgsm")
    with pytest.raises(ValueError, match=r"'fgsm_rs' is a single-step attack but train.attack_steps is 10: set "
                                         r"attack_steps to 1"):
        TrainConfig(attack="fgsm_rs", attack_steps=10)
    with pytest.raises(ValueError, match="natural training runs no attack"):
        TrainConfig(method="standard", attack="n_fgsm")
    pgd, fast = TrainConfig(), TrainConfig(attack="n_fgsm")
    assert (pgd.attack_steps, pgd.attack_alpha) == (10, pytest.approx(2 / 255))  # the defaults of every earlier run
    assert (fast.attack_steps, fast.attack_alpha) == (1, None)
    # a run folder written before train.attack (PGD) has the same identity; another attack is another run
    assert "attack" not in pgd.identity() and fast.identity()["attack"] == "n_fgsm"
    assert "overfit_guard" not in pgd.identity()
    assert dataclasses.replace(pgd, overfit_guard=False).identity()["overfit_guard"] is False
