"""A fast representative zoo: each wraps with "auto" and with a named layer, runs forward and backward, keeps its keys."""
import pytest
import timm
import torch
import torchvision

import casify

ZOO = [
    # (name, builder, named layer, input size)
    ("timm resnet18", lambda: timm.create_model("resnet18", num_classes=5), "layer3", (3, 32, 32)),
    ("timm convnext_atto", lambda: timm.create_model("convnext_atto", num_classes=5), "stages.3", (3, 64, 64)),
    ("timm efficientnet_b0", lambda: timm.create_model("efficientnet_b0", num_classes=5), "blocks.5", (3, 64, 64)),
    ("timm deit_tiny", lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=5), "blocks.11", None),
    ("timm swin_tiny", lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7,
                                                  num_classes=5), "layers.3", None),
    ("timm mobilenetv3_small_050", lambda: timm.create_model("mobilenetv3_small_050", num_classes=5), "blocks.4",
     (3, 64, 64)),
    ("torchvision vgg11_bn", lambda: torchvision.models.vgg11_bn(num_classes=5), "features.27", (3, 32, 32)),
    ("torchvision mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=5), "features.9",
     (3, 64, 64)),
    # MobileViT cannot be traced by plain torch.fx.symbolic_trace; timm's leaf modules make it work
    ("timm mobilevit_xxs (needs timm leaf modules)", lambda: timm.create_model("mobilevit_xxs", num_classes=5),
     "stages.3", (3, 64, 64)),
]


@pytest.mark.parametrize("name,builder,layer,size", ZOO, ids=[z[0] for z in ZOO])
@pytest.mark.parametrize("target", ["auto", "named"])
def test_zoo_wraps_runs_and_keeps_keys(name, builder, layer, size, target):
    torch.manual_seed(0)
    model = builder()
    wrapped = casify.wrap(model, "auto" if target == "auto" else [layer], input_size=size, init="paper")
    if target == "named":
        assert wrapped.cas_layers == [layer]
    original = set(model.state_dict())
    added = set(wrapped.state_dict()) - original
    assert original <= set(wrapped.state_dict()) and added and all(k.startswith("cas_modules.") for k in added)
    size = size or casify.model.surgery.default_input_size(model)
    x = torch.rand(2, *size, requires_grad=True)
    wrapped.train()
    with casify.route(wrapped, labels=torch.tensor([1, 4])):
        logits = wrapped(x)
    aux = casify.aux_logits(wrapped)
    loss = logits.logsumexp(1).sum() + sum(a.logsumexp(1).sum() for a in aux)
    loss.backward()
    assert logits.shape == (2, 5) and x.grad is not None
    assert all(m.classifier.weight.grad.abs().sum() > 0 for m in casify.find_cas_modules(wrapped))


def test_mobilevit_is_not_traceable_without_timm_leaf_modules():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(timm.create_model("mobilevit_xxs", num_classes=5))
