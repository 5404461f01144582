"""PGD's memory (issue 12): how many buffers of the batch's size it holds at once, and the in-place updates that keep
that number low without touching the caller's tensors. Peaks are traced from torch's own allocator events
(torch.profiler, profile_memory=True), so they are exact and repeatable, not timings or RSS samples."""
import pytest
import torch
from torch import nn

from casify.attacks import pgd

pytestmark = pytest.mark.usefixtures("one_thread")

N, SHAPE, CLASSES = 64, (3, 16, 16), 4
UNIT = N * 3 * 16 * 16 * 4  # bytes of one float32 buffer of the batch's size


def traced_peak(fn) -> int:
    """Peak of torch's live CPU allocations while ``fn`` runs, above the level before it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:
        pytest.skip("this torch does not expose the profiler's memory events")
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def linear_model():
    # Activations of this model are negligible (the linear layer saves a view of its input, and the logits are
    # N x 4), so the peak counts the attack's own buffers.
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, CLASSES)).eval()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N, *SHAPE, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def torchattacks_pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=3):
    """torchattacks 3.5.1's PGD.forward (random start), the anchor of benchmarks/cost_ratios.py."""
    images = x.clone().detach()
    adv = images.clone().detach()
    adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-eps, eps), min=0, max=1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = nn.functional.cross_entropy(model(adv), y)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


def peak_units(fn) -> float:
    fn()  # warm-up: lazy initialisation is not the attack's
    return traced_peak(fn) / UNIT


def test_the_tracer_sees_batch_sized_buffers():
    # torchattacks' PGD holds its clone of the batch, the iterate, the gradient, its sign, the scaled sign, the sum and
    # the projection's temporaries: about 7 buffers. If the tracer saw nothing, the bounds below would mean nothing.
    model, (x, y) = linear_model(), data()
    assert 6.5 <= peak_units(lambda: torchattacks_pgd(model, x, y)) <= 7.5


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("start", [True, "normal", False])
def test_pgd_holds_at_most_three_batch_buffers(norm, eps, start):
    # keep="best": the iterate, the best iterate, and the input gradient (which becomes the step in place); the
    # projection and the best-iterate update run in place. keep="last" holds one fewer. Before issue 12 the same
    # attack peaked at 8 buffers (a zero-filled direction through the backward, out-of-place step and projection).
    model, (x, y) = linear_model(), data()
    best = peak_units(lambda: pgd(model, x, y, eps=eps, alpha=eps / 4, steps=3, norm=norm, random_start=start))
    last = peak_units(lambda: pgd(model, x, y, eps=eps, alpha=eps / 4, steps=3, norm=norm, random_start=start,
                                  keep="last"))
    assert best <= 3.1, best
    assert last <= 2.1, last


def test_low_precision_pgd_keeps_a_float32_iterate_within_four_buffers():
    # bf16 model and input: the float32 iterate (1), its bf16 copy for the forward (0.5), the bf16 input gradient
    # (0.5) widened to float32 (1), and the best iterate (1). No float32 copy of the clean batch.
    model, (x, y) = linear_model(), data()
    model = model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    units = peak_units(lambda: pgd(model, xb, y, eps=8 / 255, alpha=2 / 255, steps=3))
    assert units <= 4.1, units
    x_adv = pgd(model, xb, y, eps=8 / 255, alpha=2 / 255, steps=3)
    assert x_adv.dtype == torch.bfloat16
    # the iterate moved by float32 steps, then was rounded once: within the ball up to one bf16 rounding
    assert (x_adv.float() - xb.float()).abs().max() <= 8 / 255 + 2 ** -8


@pytest.mark.parametrize("start", [True, False, "normal"])
@pytest.mark.parametrize("keep", ["best", "last"])
def test_in_place_updates_never_touch_the_callers_batch(start, keep):
    model, (x, y) = linear_model(), data()
    before = x.clone()
    x_adv = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=3, random_start=start, keep=keep)
    assert torch.equal(x, before)
    assert x_adv.data_ptr() != x.data_ptr()
    assert (x_adv - x).abs().max() > 0


class PixelSum(nn.Module):
    """Its input gradient is an expanded tensor (every pixel of a channel shares one value): written in place it
    would corrupt or raise, so the attack must copy it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, x):
        return self.fc(x.sum(dim=(2, 3)))


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_an_expanded_input_gradient_is_copied_not_written(norm, eps):
    torch.manual_seed(0)
    model, (x, y) = PixelSum().eval(), data()
    x_adv = pgd(model, x, y, eps=eps, steps=2, norm=norm, random_start=False, keep="last")
    delta = x_adv - x
    # every unclipped pixel of a channel moves the same way, as the shared gradient says
    inside = (x_adv > 0) & (x_adv < 1) & (x > 0.1) & (x < 0.9)
    for c in range(3):
        moved = delta[:, c][inside[:, c]]
        assert moved.numel() > 0
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
        signs = torch.sign(delta)
        for i in range(4):
            for c in range(3):
                s = signs[i, c][inside[i, c]]
                assert bool((s == s[0]).all())
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-5
