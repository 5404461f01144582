"""Channel-wise activation analysis: hand-checked statistics, capture at modules / nodes / CAS layers, the end-to-end
report with its figures, t-SNE and the command line."""
import json
import math
import warnings

import pytest
import torch
from torch import nn

import casify
from casify import analysis as A
from casify.analysis import (ActivationProbe, activation_frequency, analyze, channel_activations, channel_magnitude,
                             class_frequency_summary, frequency_gap, gini, magnitude_gap, normalized_entropy,
                             tsne_plot)


def images(n: int, seed: int = 0, size: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % classes


# -- statistics on constructed activations ---------------------------------------------------------------------------
def test_channel_magnitude_is_mean_absolute_value():
    acts = torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]])
    assert channel_magnitude(acts).tolist() == [2.0, 2.0, 0.0]


def test_magnitude_gap_hand_values():
    gap = magnitude_gap(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 3.0]))
    assert gap["mean_difference"] == pytest.approx(1.0)
    assert gap["ratio"] == pytest.approx(1.5)
    assert gap["mean_natural"] == pytest.approx(2.0) and gap["mean_adversarial"] == pytest.approx(3.0)
    assert math.isnan(magnitude_gap(torch.zeros(3), torch.ones(3))["ratio"])


def test_activation_frequency_counts_channels_above_one_percent_of_the_example_max():
    acts = torch.tensor([
        [10.0, 0.05, 0.2, 5.0],    # threshold 0.1: channels 0, 2, 3
        [0.0, 1.0, 0.005, 2.0],    # threshold 0.02: channels 1, 3
        [-1.0, -2.0, -3.0, -4.0],  # nothing positive: nothing active
        [1.0, 1.0, 1.0, 1.0],      # all
    ])
    assert activation_frequency(acts).tolist() == [0.5, 0.5, 0.5, 0.75]
    # A larger threshold truncates more (Appendix F.6); the largest channel itself is always active.
    assert activation_frequency(acts[:1], threshold=0.5).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("channels", [2, 8, 512])
def test_uniformity_of_uniform_and_one_hot_frequencies(channels):
    uniform = torch.full((channels,), 0.3)
    one_hot = torch.zeros(channels)
    one_hot[channels // 2] = 0.9
    assert normalized_entropy(uniform) == pytest.approx(1.0)
    assert gini(uniform) == pytest.approx(0.0, abs=1e-12)
    assert normalized_entropy(one_hot) == pytest.approx(0.0, abs=1e-12)
    assert gini(one_hot) == pytest.approx((channels - 1) / channels)


def test_uniformity_hand_values_and_degenerate_cases():
    half = torch.tensor([1.0, 0.0, 1.0, 0.0])  # two of four channels, equally
    assert normalized_entropy(half) == pytest.approx(0.5)
    assert gini(half) == pytest.approx(0.5)
    assert gini(2 * half) == pytest.approx(0.5)  # scale-free
    assert gini(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 9)  # sum_i (2i-n-1) x_i / (n sum x) = 4 / 18
    assert math.isnan(normalized_entropy(torch.zeros(4))) and math.isnan(gini(torch.zeros(4)))


def test_frequency_gap_uses_the_channels_natural_examples_rarely_activate():
    nat = torch.tensor([0.9, 0.1, 0.5, 0.0])
    adv = torch.tensor([0.8, 0.6, 0.5, 0.4])
    gap = frequency_gap(nat, adv)
    assert gap["mean_abs_difference"] == pytest.approx(0.25)
    assert gap["rare_channels"] == 2  # channels 1 and 3
    assert gap["rare_frequency_natural"] == pytest.approx(0.05)
    assert gap["rare_frequency_adversarial"] == pytest.approx(0.5)
    assert gap["frequent_frequency_natural"] == pytest.approx(0.7)
    assert gap["frequent_frequency_adversarial"] == pytest.approx(0.65)
    assert frequency_gap(nat, adv, rare_fraction=0.25)["rare_frequency_adversarial"] == pytest.approx(0.4)


def test_class_frequency_summary_averages_per_class_statistics():
    nat = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: nat [1, 0], adv [1, 1] -> gap 0.5; class 1: nat [0.5, 1], adv [0.5, 1] -> gap 0
    out = class_frequency_summary(nat, adv, labels)
    assert out["classes"] == 2
    assert out["mean_abs_difference"] == pytest.approx(0.25)
    assert out["rare_frequency_adversarial"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["gini_natural"] == pytest.approx((0.5 + gini(torch.tensor([0.5, 1.0]))) / 2)


# -- capture -----------------------------------------------------------------------------------------------------------
def _hook(module, fn=lambda out: out):
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(fn(out).detach()))
    return seen, handle


def test_capture_at_module_and_node_names_matches_manual_hooks(tiny_net):
    x, _ = images(6)
    tiny_net.eval()
    block, h1 = _hook(tiny_net.block)
    stem, h2 = _hook(tiny_net.stem)
    tiny_net(x)
    h1.remove(), h2.remove()
    torch.testing.assert_close(channel_activations(tiny_net, x, "block"), block[0].mean((2, 3)))
    # "relu_1" is the second torch.relu call site: relu of the block's output.
    torch.testing.assert_close(channel_activations(tiny_net, x, "relu_1"), torch.relu(block[0]).mean((2, 3)))
    # stem is (N, 8, 8, 8): C == H == W, resolved by a run at twice the input size.
    torch.testing.assert_close(channel_activations(tiny_net, x, "stem", batch_size=4), stem[0].mean((2, 3)))
    with pytest.raises(casify.LayerError, match="closest names"):
        channel_activations(tiny_net, x, "blok")


class TokenNet(nn.Module):
    """Patches as tokens, (N, L, C), and a channels-last map (N, H, W, C)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 2, stride=2)
        self.proj = nn.Linear(6, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        nhwc = self.patch(x).permute(0, 2, 3, 1)
        tokens = self.proj(nhwc.flatten(1, 2))
        return self.fc(tokens.mean(1))


def test_capture_tokens_and_channels_last():
    torch.manual_seed(0)
    net = TokenNet().eval()
    x, _ = images(4, size=8)
    nhwc = net.patch(x).permute(0, 2, 3, 1)
    torch.testing.assert_close(channel_activations(net, x, "proj"), net.proj(nhwc.flatten(1, 2)).mean(1))
    torch.testing.assert_close(channel_activations(net, x, "permute"), nhwc.mean((1, 2)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_capture_falls_back_to_a_hook_when_the_model_cannot_be_traced():
    torch.manual_seed(0)
    net = Untraceable().eval()
    x, _ = images(3, size=6)
    torch.testing.assert_close(channel_activations(net, x, "conv"), net.conv(x).mean((2, 3)))


def test_capture_on_a_cas_model_before_and_after_the_mask(tiny_net):
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None, init="paper")
    x, _ = images(6)
    cas = casify.find_cas_modules(wrapped)[0]
    seen = []
    handle = cas.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    wrapped.eval()
    wrapped(x)
    handle.remove()
    pooled = seen[0].mean((2, 3))
    mask = cas.classifier.weight[cas.classifier(pooled).argmax(1)]  # predicted routing, as at test time
    masked = seen[0] * mask[:, :, None, None]

    wrapped.train()  # the capture runs in eval mode with predicted routing and restores the mode, without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = channel_activations(wrapped, x, "block", cas_side="after")
        default = channel_activations(wrapped, x, "block")
    assert wrapped.training and all(m.training for m in wrapped.modules())
    torch.testing.assert_close(after, pooled * mask)
    torch.testing.assert_close(channel_activations(wrapped, x, "block", cas_side="before"), pooled)
    torch.testing.assert_close(default, pooled)  # the default is before the mask (the CAS module's input)
    # Downstream layers see the masked activation; upstream ones are the original's.
    torch.testing.assert_close(channel_activations(wrapped, x, "relu_1"), torch.relu(masked).mean((2, 3)))
    # "block.2" names the same tensor as "block", so it is the CAS layer too.
    torch.testing.assert_close(channel_activations(wrapped, x, "block.2", cas_side="after"), pooled * mask)
    torch.testing.assert_close(channel_activations(wrapped, x, "block.2", cas_side="before"), pooled)
    torch.testing.assert_close(channel_activations(wrapped, x, "block.2"), pooled)
    stem = []
    handle = tiny_net.stem.register_forward_hook(lambda m, a, out: stem.append(out.detach()))
    wrapped.eval()
    wrapped(x)
    handle.remove()
    torch.testing.assert_close(channel_activations(wrapped, x, "stem"), stem[0].mean((2, 3)))
    with ActivationProbe(wrapped, "block", cas_side="after") as probe:
        assert "after" in probe.captured
        assert probe.capture_point == "after CAS mask (output of cas_modules.block)"
        logits, _ = probe(x)
    torch.testing.assert_close(logits, wrapped(x))
    with ActivationProbe(wrapped, "block") as probe:
        assert "before" in probe.captured
        assert probe.capture_point == "before CAS mask (input of cas_modules.block)"
    with ActivationProbe(wrapped, "block.2") as probe:  # resolved through the graph: the same point, the same words
        assert probe.capture_point == "before CAS mask (input of cas_modules.block)"
    with ActivationProbe(wrapped, "relu_1") as probe:
        assert probe.capture_point == "layer output (no CAS module at this layer)"
    with ActivationProbe(tiny_net, "block") as probe:
        assert probe.capture_point == "layer output (no CAS module)"


def test_capture_is_before_the_cas_mask_so_negatively_weighted_channels_still_count(tiny_net, tmp_path, monkeypatch):
    """At a CAS layer the analysis reads the CAS module's input, the layer's own output: a channel whose mask weight
    is negative is never "active" after the mask, but before it the layer's activity is what is counted. A model
    without CAS is read at the same point (the layer's output), so the two compare like for like."""
    with torch.no_grad():  # the block's last conv outputs ~1 everywhere, so relu_1 keeps every channel positive
        tiny_net.block[2].weight.mul_(0.01)
        tiny_net.block[2].bias.fill_(1.0)
    wrapped = casify.wrap(tiny_net, layers=["relu_1"], input_size=(3, 8, 8), normalize=None)
    cas = casify.find_cas_modules(wrapped)[0]
    negative = [0, 1, 2]
    with torch.no_grad():  # a hand-set mask: every class's row is +1, except channels 0-2 at -1
        cas.classifier.weight.fill_(1.0)
        cas.classifier.weight[:, negative] = -1.0
        cas.classifier.bias.zero_()
    x, y = images(10)
    titles = []
    real_figure = A.figures.new_figure

    def figure(*a, **k):
        fig = real_figure(*a, **k)
        titles.append(fig)
        return fig

    monkeypatch.setattr(A.figures, "new_figure", figure)
    report = analyze(wrapped, (x, y), "relu_1", steps=1, class_index=0, out_dir=tmp_path)
    point = "before CAS mask (input of cas_modules.relu_1)"
    assert report.capture_point == point and report.cas_side == "before"
    freq = report.frequency["natural"]
    assert freq[negative].tolist() == [1.0, 1.0, 1.0] and bool((freq == 1.0).all())
    assert bool((report.natural_activations[:, negative] > 0).all())
    # ... and the report says where it looked: JSON, markdown, figure titles and axis labels.
    assert json.loads((tmp_path / "channel_report.json").read_text())["capture_point"] == point
    assert point in (tmp_path / "channel_report.md").read_text()
    assert len(titles) == 2
    for fig in titles:
        ax = fig.axes[0]
        assert point in ax.get_title() and "before CAS mask" in ax.get_ylabel()

    # After the mask the same channels are negative, never active: the mask, not the layer, would be measured.
    after = analyze(wrapped, (x, y), "relu_1", steps=1, class_index=0, cas_side="after")
    assert after.capture_point == "after CAS mask (output of cas_modules.relu_1)"
    assert after.frequency["natural"][negative].tolist() == [0.0, 0.0, 0.0]
    assert bool((after.natural_activations[:, negative] < 0).all())

    # The baseline without CAS, read at its layer's output, is the same point of the network.
    base = analyze(tiny_net, (x, y), "relu_1", steps=1, class_index=0)
    assert base.capture_point == "layer output (no CAS module)"
    torch.testing.assert_close(base.natural_activations, report.natural_activations)


# -- analyze, t-SNE, CLI ----------------------------------------------------------------------------------------------
def test_analyze_end_to_end_writes_figures_and_report(tiny_net, tmp_path):
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None, init="paper")
    x, y = images(20)
    report = analyze(wrapped, (x, y), "block", steps=2, class_index=1, max_examples=15, batch_size=8,
                     out_dir=tmp_path)
    for name in ("channel_magnitude.png", "channel_frequency.png", "channel_report.json", "channel_report.md"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "channel_report.json").read_text())
    assert data["layer"] == "block" and data["cas_side"] == "before" and "before" in data["captured"]
    assert data["capture_point"] == "before CAS mask (input of cas_modules.block)"
    assert data["channels"] == 16 and data["num_examples"] == 15 and data["threshold"] == 0.01
    assert data["attack"]["objective"] == "cas" and data["attack"]["steps"] == 2
    assert set(data["accuracy"]) == {"natural", "adversarial"}
    mag = data["magnitude"]
    assert len(mag["natural"]) == len(mag["adversarial"]) == 16
    assert {"mean_difference", "ratio"} <= set(mag)
    freq = data["frequency"]
    assert freq["class_index"] == 1 and freq["class_examples"] == 3  # labels 1, 6, 11 among the first 15
    assert len(freq["natural"]) == len(freq["adversarial"]) == 16
    for key in ("entropy_natural", "entropy_adversarial", "gini_natural", "gini_adversarial", "mean_abs_difference",
                "rare_frequency_natural", "rare_frequency_adversarial"):
        assert key in freq and key in data["frequency_class_mean"]
    assert data["frequency_class_mean"]["classes"] == 5
    assert set(data["figures"]) == {"magnitude", "frequency", "report", "markdown"}
    assert data["figures"]["magnitude"] == "channel_magnitude.png"  # relative to the report's folder
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temporary file
    # The statistics are those of the captured activations (tensors (x, y) are read in order).
    nat = channel_activations(wrapped, x[:15], "block")
    torch.testing.assert_close(report.natural_activations, nat)
    assert mag["natural"] == pytest.approx(channel_magnitude(nat).tolist())
    assert freq["natural"] == pytest.approx(activation_frequency(nat[y[:15] == 1]).tolist())


def test_analyze_plain_model_defaults_and_missing_class(tiny_net, tmp_path):
    x, y = images(8)
    dataset = torch.utils.data.TensorDataset(x, y % 2)
    with pytest.warns(UserWarning, match="no example of class 4"):
        report = analyze(tiny_net, dataset, steps=1, class_index=4, max_examples=6, out_dir=tmp_path)
    # The last activation with positions: the functional relu after the block (casify.wrap's "auto" layer).
    assert report.layer == "relu_1" and report.attack["objective"] == "ce" and report.num_examples == 6
    assert "natural" not in report.frequency and "frequency" not in report.figures
    assert not (tmp_path / "channel_frequency.png").exists() and (tmp_path / "channel_magnitude.png").exists()
    assert report.frequency_class_mean["classes"] == 2


def test_tsne_plot_of_penultimate_features(tiny_net, tmp_path):
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None, init="paper")
    x, y = images(12)
    result = tsne_plot(wrapped, (x, y), tmp_path / "tsne.png", steps=1, perplexity=3, max_examples=10)
    assert result.path.stat().st_size > 0
    assert result.natural.shape == result.adversarial.shape == (10, 2) and len(result.labels) == 10
    # Penultimate features are the final classifier's input (not a CAS module's auxiliary classifier's).
    fc_in = []
    handle = tiny_net.fc.register_forward_pre_hook(lambda m, a: fc_in.append(a[0].detach()))
    wrapped.eval()
    wrapped(x[:4])
    handle.remove()
    probe = A.capture.ClassifierInputProbe(wrapped)
    torch.testing.assert_close(probe(x[:4]), fc_in[0])
    probe.close()


def test_cli_analyze_on_a_saved_model(tmp_path, capsys):
    import timm

    import casify_cli
    from casify import cli
    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet18", num_classes=10, width=0.125)
    casify.wrap(base, layers=["layer4.1"], input_size=(3, 16, 16), init="paper").save_pretrained(tmp_path / "model")
    argv = ["analyze", str(tmp_path / "model"), "--data", "digits", "--out", str(tmp_path / "out"),
            "--eps", "4/255", "--steps", "1", "--max-examples", "12", "--device", "cpu"]
    args = casify_cli.build_parser().parse_args(argv)
    assert cli.COMMANDS[args.command] is cli.cmd_analyze and args.eps == pytest.approx(4 / 255)
    assert args.cas_side == "before" and not args.overwrite
    assert not hasattr(A, "add_analyze_parser") and not hasattr(A, "analyze_main")  # the CLI owns the parsing
    assert casify_cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / "channel_report.json").read_text())
    assert report["layer"] == "layer4.1" and report["channels"] == 64 and report["num_examples"] == 12
    assert report["capture_point"] == "before CAS mask (input of cas_modules.layer4_1)"
    printed = json.loads(capsys.readouterr().out)
    assert printed["layer"] == "layer4.1" and printed["capture_point"] == report["capture_point"]
    assert printed["figures"]["magnitude"] == str(tmp_path / "out" / "channel_magnitude.png")  # the final folder
    assert (tmp_path / "out" / "channel_report.json").exists() and (tmp_path / "out" / "channel_magnitude.png").exists()
    assert "before CAS mask" in (tmp_path / "out" / "channel_report.md").read_text()


class Outer(nn.Module):
    """A traceable model around an untraceable block, wrapped with that block as an fx leaf."""

    def __init__(self):
        super().__init__()
        self.inner = Untraceable()
        self.inner.fc = nn.Identity()
        self.conv = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        h = self.inner.conv(x)
        h = self.inner(x)[:, :, None, None] * h
        return self.fc(torch.relu(self.conv(h)).mean((2, 3)))


def test_capture_on_a_cas_model_wrapped_with_extra_leaf_modules():
    torch.manual_seed(0)
    net = Outer()
    wrapped = casify.wrap(net, layers=["conv"], leaf_modules=[Untraceable], input_size=(3, 6, 6), normalize=None)
    x, _ = images(3, size=6)
    seen, handle = _hook(net.inner)
    wrapped.eval()
    wrapped(x)
    handle.remove()
    torch.testing.assert_close(channel_activations(wrapped, x, "inner"), seen[0])
