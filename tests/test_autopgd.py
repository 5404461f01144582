"""AutoAttack's APGD / APGD-T on casify's objectives (casify.attacks.autopgd): they stay in the ball, find what the masked
final-logit objective misses, draw per example (batch-independent) and leave the global random state alone."""
import pytest
import torch

from casify.attacks.autopgd import ObjectiveAdapter, apgd, apgd_targeted, dlr, dlr_targeted
from casify.evaluate import deployed_correct
from test_attacks import cas_net, make_data, train

pytest.importorskip("pyautoattack")
pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.05


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return train(cas_net()).eval()


def gens(indices):
    return [torch.Generator().manual_seed(i) for i in indices]


def test_dlr_losses_match_their_definitions():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0, -2.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    assert dlr(z, y).item() == pytest.approx(-(3.0 - 1.0) / (3.0 - 0.5))
    assert dlr_targeted(z, y, t).item() == pytest.approx(-(3.0 - 0.5) / (3.0 - 0.5 * (0.5 - 1.0)))
    assert dlr(z, torch.tensor([1])).item() > 0  # misclassified: positive


def test_adapter_returns_deployed_logits_and_the_joint_gradient(model):
    x, y = make_data(8, 5)
    adapter = ObjectiveAdapter(model, loss="cas", routing="target")
    logits, loss, grad = adapter.get_logits_loss_grad_target(x, y, (y + 1) % 4)
    assert torch.equal(logits.argmax(1) == y, deployed_correct(model, x, y))
    assert loss.shape == (8,) and grad.shape == x.shape and grad.abs().sum() > 0


def test_apgd_rows_stay_in_the_ball_and_beat_final_logits(model):
    x, y = make_data(48, 5)
    final = apgd(model, x, y, eps=EPS, steps=20, loss="ce", generator=gens(range(48)))
    rng = torch.get_rng_state()
    joint = apgd(model, x, y, eps=EPS, steps=20, loss="dlr_cas", generator=gens(range(48)))
    targeted, info = apgd_targeted(model, x, y, eps=EPS, steps=20, n_targets=3, generator=gens(range(48)),
                                   return_info=True)
    assert torch.equal(rng, torch.get_rng_state())  # APGD seeds torch's global generator: casify forks it
    for x_adv in (final, joint, targeted):
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    acc = {k: deployed_correct(model, v, y).float().mean().item()
           for k, v in {"final": final, "joint": joint, "targeted": targeted}.items()}
    # the CAS net's argmax routing masks the final-logit gradient: the objectives that see the heads find more (a
    # 0.48 gap on the development machine; the margin asked here leaves room for another CPU's training outcome)
    assert acc["joint"] < acc["final"] - 0.05 and acc["targeted"] < acc["final"] - 0.05, acc
    assert torch.equal(info.fooled, ~deployed_correct(model, targeted, y))


def test_apgd_is_batch_independent(model):
    x, y = make_data(32, 5)
    with torch.backends.mkldnn.flags(enabled=False):  # ATen's per-image kernels: the property, not a kernel detail
        whole = apgd_targeted(model, x, y, eps=EPS, steps=8, generator=gens(range(32)))
        parts = torch.cat([apgd_targeted(model, x[i:i + 8], y[i:i + 8], eps=EPS, steps=8, generator=gens(range(i, i + 8)))
                           for i in range(0, 32, 8)])
    assert torch.equal(whole, parts)


def test_too_few_classes_is_a_clear_error():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="needs 4 classes"):
        apgd_targeted(net, x, y, eps=EPS, steps=2)
