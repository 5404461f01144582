"""casify.wrap: targeting by name, node, regex and auto; function preservation; keys, modes, metadata; unwrap; errors."""
import copy
import re

import pytest
import timm
import torch
import torchvision
from torch import nn

import casify
from casify import LayerError, TraceError


def _resnet18(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, **kwargs)


def test_quickstart_line_works():
    model = casify.wrap(timm.create_model("resnet18", pretrained=False), layers=["layer4"])
    model.eval()
    logits = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1000)
    assert list(model.cas_outputs) == ["layer4"] and model.cas_outputs["layer4"].shape == (2, 1000)


@pytest.mark.parametrize("training", [False, True])
def test_identity_init_preserves_the_original_function(training):
    original = _resnet18(drop_rate=0.3, drop_path_rate=0.2)
    reference = copy.deepcopy(original)
    wrapped = casify.wrap(original, layers=["layer3", "layer4.0", "layer4.1"], normalize=None)
    reference.train(training), wrapped.train(training)
    x = torch.rand(4, 3, 64, 64)
    torch.manual_seed(7)
    expected = reference(x)
    torch.manual_seed(7)
    with casify.route(wrapped, labels=torch.tensor([0, 1, 2, 3])):
        got = wrapped(x)
    torch.testing.assert_close(got, expected)
    if training:  # batch norm statistics moved identically in both
        torch.testing.assert_close(wrapped.bn1.running_mean, reference.bn1.running_mean)


def test_paper_placement_resnet18_after_each_layer4_block():
    wrapped = casify.wrap(_resnet18(), layers=["layer4.0", "layer4.1"], init="paper", normalize=None)
    assert wrapped.cas_layers == ["layer4.0", "layer4.1"]
    nodes = {n.name: n for n in wrapped.graph.nodes}
    first = nodes["cas_layer4_0"]
    # The first block's masked output feeds the second block, shortcut included.
    users = {u.target if u.op == "call_module" else u.name for u in first.users}
    assert "layer4.1.conv1" in users and any("add" in str(u) for u in users)
    second = nodes["cas_layer4_1"]
    assert [u.target for u in second.users] == ["global_pool.pool"]
    assert len(casify.find_cas_modules(wrapped)) == 2


def test_names_follow_torchvision_feature_extraction_naming():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    names = {l.name: l for l in casify.list_layers(model, input_size=(3, 64, 64))}
    assert "layer4.1.relu_1" in names and names["layer4.1.relu_1"].kind == "node"
    assert names["layer4"].shape == (2, 512, 2, 2) and names["layer4"].layout == "NCHW"
    # the second call site of the shared relu is the block output
    wrapped = casify.wrap(model, layers=["layer4.1.relu_1"], normalize=None, input_size=(3, 64, 64))
    assert wrapped.cas_layers == ["layer4.1.relu_1"]
    with pytest.raises(LayerError, match="same tensor"):
        casify.wrap(model, layers=["layer4", "layer4.1.relu_1"], input_size=(3, 64, 64))


def test_regex_and_auto_targets():
    model = _resnet18()
    wrapped = casify.wrap(model, layers=["re:layer4\\.\\d"], normalize=None)
    assert wrapped.cas_layers == ["layer4.0", "layer4.1"]
    wrapped = casify.wrap(model, layers=[re.compile(r"layer[34]")], normalize=None)
    assert wrapped.cas_layers == ["layer3", "layer4"]
    assert casify.wrap(model, "auto").cas_layers == ["layer4"]


def test_class_count_comes_from_the_model():
    wrapped = casify.wrap(timm.create_model("resnet18", num_classes=37), layers="auto")
    assert all(m.num_classes == 37 for m in casify.find_cas_modules(wrapped))
    assert wrapped.num_classes == 37


def test_keys_modes_and_metadata_are_kept():
    original = _resnet18(drop_rate=0.5)
    keys = set(original.state_dict())
    wrapped = casify.wrap(original, layers=["layer4"])
    assert keys <= set(wrapped.state_dict())
    assert {k for k in wrapped.state_dict() if k not in keys} == {"cas_modules.layer4.classifier.weight",
                                                                  "cas_modules.layer4.classifier.bias"}
    # pretrained weights load into the wrapped model (strictly on the original's keys) and back
    wrapped.load_state_dict(original.state_dict(), strict=False)
    original.load_state_dict({k: v for k, v in wrapped.state_dict().items() if k in keys}, strict=True)
    assert wrapped.pretrained_cfg["architecture"] == "resnet18"
    assert wrapped.num_features == 512
    wrapped.eval()
    assert not wrapped.layer1[0].bn1.training and not wrapped.training
    wrapped.train()
    assert wrapped.layer1[0].bn1.training


def test_normalisation_inside_the_model():
    original = _resnet18()
    wrapped = casify.wrap(original, layers=["layer4"], normalize=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    original.eval(), wrapped.eval()
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), original((x - mean) / std))
    timm_default = casify.wrap(original, layers=["layer4"])  # "auto": timm's pretrained_cfg
    assert timm_default.casify_config["normalize"]["mean"] == list(original.pretrained_cfg["mean"])
    # "auto" on torchvision: the mean/std of the architecture's published weights (tests/test_normalize_auto.py)
    assert casify.wrap(torchvision.models.resnet18(), layers=["layer4"]).casify_config["normalize"] == {
        "mean": pytest.approx([0.485, 0.456, 0.406]), "std": pytest.approx([0.229, 0.224, 0.225])}


def test_channel_layouts_nhwc_and_tokens():
    from conftest import ChannelsLast
    wrapped = casify.wrap(ChannelsLast(), layers=["norm"], input_size=(3, 16, 16), init="paper")
    module = casify.find_cas_modules(wrapped)[0]
    assert module.channel_dim == 3 and module.num_channels == 6
    wrapped.eval()
    assert wrapped(torch.rand(2, 3, 16, 16)).shape == (2, 4)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)
    wrapped = casify.wrap(vit, layers=["blocks.11", "norm"])
    modules = casify.find_cas_modules(wrapped)
    assert [(m.ndim, m.channel_dim, m.num_channels) for m in modules] == [(3, 2, 192), (3, 2, 192)]


def test_ambiguous_layout_is_resolved_by_a_second_size(tiny_net):
    # TinyNet's stem output at 8x8 input is (N, 8, 8, 8): C == H == W
    wrapped = casify.wrap(tiny_net, layers=["stem"], input_size=(3, 8, 8))
    assert casify.find_cas_modules(wrapped)[0].channel_dim == 1


def test_unwrap_returns_the_original_architecture_with_trained_weights():
    original = _resnet18()
    wrapped = casify.wrap(original, layers=["layer4"])
    with torch.no_grad():
        wrapped.fc.weight.add_(1.0)
    wrapped.eval()
    plain = casify.unwrap(wrapped)
    assert type(plain) is type(original) and not plain.training
    assert set(plain.state_dict()) == set(_resnet18().state_dict())
    torch.testing.assert_close(plain.fc.weight, wrapped.fc.weight)
    with pytest.raises(TypeError, match="casify.wrap"):
        casify.unwrap(original)


def test_deepcopy_is_independent_and_pickling_is_refused():
    wrapped = casify.wrap(_resnet18(), layers=["layer4"])
    twin = copy.deepcopy(wrapped)
    with torch.no_grad():
        twin.fc.weight.zero_()
    assert wrapped.fc.weight.abs().sum() > 0
    x = torch.rand(1, 3, 32, 32)
    twin.eval()
    assert torch.allclose(twin(x), twin.fc.bias.expand(1, -1))
    import pickle
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(wrapped)


def test_bad_layers_are_explained():
    model = _resnet18()
    with pytest.raises(LayerError, match=r"no module or graph node named 'layer5'.*layer4"):
        casify.wrap(model, layers=["layer5"])
    with pytest.raises(LayerError, match=r"'fc' is the model's output \(its logits, shape \(2, 10\)\).*features"):
        casify.wrap(model, layers=["fc"])
    with pytest.raises(LayerError, match="fully matches no layer"):
        casify.wrap(model, layers=["re:block\\d+"])
    with pytest.raises(ValueError, match="already wrapped"):
        casify.wrap(casify.wrap(model, layers=["layer4"]), layers=["layer3"])


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = DataDependent()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean(dim=(2, 3)))


def test_untraceable_model_error_says_what_to_do_and_leaf_modules_fix_it():
    with pytest.raises(TraceError, match=r"(?s)inside .gate. \(DataDependent\).*leaf_modules"):
        casify.wrap(Untraceable(), layers=["conv"], input_size=(3, 8, 8))
    wrapped = casify.wrap(Untraceable(), layers=["gate"], input_size=(3, 8, 8), leaf_modules=[DataDependent])
    assert wrapped.cas_layers == ["gate"]


def test_cas_on_an_mlp_heads_feature_vector_is_listed_on_request_and_named_explicitly():
    """(N, C) features (a flatten + MLP head's hidden layer): listed by list_layers(features=True) with layout NC, never
    picked by a pattern or "auto"; CAS there keeps the function at identity init and masks the hidden units."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    plain = {l.name for l in casify.list_layers(model, input_size=(3, 8, 8))}
    listed = {l.name: l for l in casify.list_layers(model, input_size=(3, 8, 8), features=True)}
    assert "4" not in plain and listed["4"].layout == "NC" and listed["4"].channel_dim == 1
    assert casify.wrap(model, layers="re:\\d", normalize=None, input_size=(3, 8, 8)).cas_layers == ["0", "1"]
    wrapped = casify.wrap(model, layers=["4"], init="identity", normalize=None, input_size=(3, 8, 8)).eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
        hidden = model[:5](x)
        cas = wrapped.cas_modules["4"]
        cas.classifier.weight.uniform_(-1, 1)
        y = torch.tensor([0, 3, 9, 1, 2])
        with casify.route(wrapped, labels=y):
            out = wrapped(x)
        torch.testing.assert_close(out, model[5](hidden * cas.classifier.weight[y]))
        torch.testing.assert_close(wrapped.cas_outputs["4"], cas.classifier(hidden))


def test_a_headless_backbones_last_map_is_a_layer_not_refused_as_logits():
    """A backbone whose output is its last feature map (not (N, classes) logits) keeps that map as a candidate, for
    "auto" and by name, when the class count is given."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3),
                                   torch.nn.ReLU()).eval()
    assert "3" in {l.name for l in casify.list_layers(backbone, input_size=(3, 8, 8))}
    for layers in (["3"], "auto"):
        wrapped = casify.wrap(backbone, layers=layers, num_classes=5, normalize=None, input_size=(3, 8, 8))
        assert wrapped.cas_layers == ["3"]
        with torch.no_grad():
            wrapped.eval()(torch.rand(2, 3, 8, 8))
            assert wrapped.cas_outputs["3"].shape == (2, 5)
