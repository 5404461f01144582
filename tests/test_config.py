"""DefenseConfig: one typed, versioned config for wrap and from_pretrained; the public homes of what used to be private."""
import copy
import json

import pytest
import torch

import casify
from casify import DefenseConfig, LoadError, Layout
from casify.core.config_validation import CONFIG_VERSION
from casify.core.discovery import auto_layer_of, infer_layout, resolve_node, traced_with_shapes


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "versions"}


def test_wrap_with_a_config_equals_the_keyword_form(tiny_net):
    keyword = casify.wrap(copy.deepcopy(tiny_net), layers=["block"], init="paper", input_size=(3, 8, 8),
                          normalize="imagenet", class_names=list("abcde"))
    torch.manual_seed(0)
    typed = casify.wrap(copy.deepcopy(tiny_net), DefenseConfig(layers=["block"], init="paper", input_size=(3, 8, 8),
                                                           normalize="imagenet", class_names=list("abcde")))
    assert _settings(typed.casify_config) == _settings(keyword.casify_config)
    typed.load_state_dict(keyword.state_dict())
    keyword.eval(), typed.eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(typed(x), keyword(x), rtol=0, atol=0)


def test_the_resolved_config_round_trips_and_rebuilds_the_model(tiny_net):
    wrapped = casify.wrap(copy.deepcopy(tiny_net), layers="re:block", input_size=(3, 8, 8), normalize=None)
    config = wrapped.cas_config
    assert isinstance(config, DefenseConfig) and config.is_resolved
    assert config.layers == ["block"] and config.channel_dims == {"block": 1} and config.channels == {"block": 16}
    assert config.num_classes == 5 and config.input_size == (3, 8, 8) and config.version == CONFIG_VERSION
    assert config.to_dict() == wrapped.casify_config
    assert DefenseConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    again = casify.wrap(copy.deepcopy(tiny_net), config)
    assert _settings(again.casify_config) == _settings(wrapped.casify_config)


def test_a_config_and_keywords_together_are_refused(tiny_net):
    with pytest.raises(TypeError, match="init"):
        casify.wrap(tiny_net, DefenseConfig(layers=["block"]), init="paper")


def test_saved_config_is_versioned_and_a_newer_version_is_refused(tmp_path, tiny_net):
    from conftest import TinyNet
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None)
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config_version"] == CONFIG_VERSION and config["format"] == "casify"
    assert DefenseConfig.from_json_file(tmp_path / "config.json").layers == ["block"]
    config["config_version"] = CONFIG_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="config_version"):
        casify.from_pretrained(tmp_path, model=TinyNet())


def test_a_config_without_a_version_reads_as_version_1_and_upgrades_to_cas():
    old = {"base_model": {"source": "custom", "name": "x.Net", "kwargs": {}},
           "cas": {"layers": ["block"], "init": "identity", "suppress": True, "num_classes": 5}, "normalize": None,
           "metrics": {"accuracy": 0.5}, "format": "casify", "weights_sha256": "0" * 64}
    config = DefenseConfig.from_dict(old, validate=True)
    # version 1 (no config_version) knew one defense: it upgrades to the current layout as CAS
    assert config.version == CONFIG_VERSION == 2 and config.layers == ["block"] and config.input_size is None
    assert config.defense == "cas" and config.defense_options == {}
    assert DefenseConfig.from_dict({**old, "config_version": 1}, validate=True).defense == "cas"
    assert config.extra == {"metrics": {"accuracy": 0.5}}  # file fields (format, checksum) stay with the file
    with pytest.raises(LoadError, match="cas.num_classes"):
        DefenseConfig.from_dict({**old, "cas": {**old["cas"], "num_classes": -1}}, validate=True)


def test_layout_is_a_string_enum():
    layers = {l.name: l for l in casify.list_layers(casify.wrap(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3)), layers=[], input_size=(3, 8, 8)),
        input_size=(3, 8, 8))}
    assert layers["0"].layout is Layout.NCHW and layers["0"].layout == "NCHW"
    assert json.dumps(layers["0"].layout) == '"NCHW"' and f"{layers['0'].layout}" == "NCHW"
    assert infer_layout((2, 7, 7, 16)) == (3, Layout.NHWC) and Layout.NLC.channel_dim == 2
    assert infer_layout((2, 4, 4, 4))[1] == Layout.AMBIGUOUS


def test_discovery_is_public_and_agrees_with_wrap(tiny_net):
    name = auto_layer_of(tiny_net, (3, 8, 8))
    assert casify.wrap(tiny_net, input_size=(3, 8, 8)).cas_layers == [name]
    traced = traced_with_shapes(tiny_net, (3, 8, 8))
    assert resolve_node(traced, name) is not None and resolve_node(traced, "nothing") is None


def test_the_model_exposes_its_graphs_and_original_read_only(tiny_net):
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8))
    assert wrapped.base_model is tiny_net
    assert set(wrapped.graphs) == {False, True} and wrapped.eval_graph is wrapped.graphs[False]
    with pytest.raises(TypeError):
        wrapped.graphs[False] = None
    wrapped.train()
    assert wrapped.graph is wrapped.graphs[True]


def test_route_state_is_public(tiny_net):
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8))
    module = casify.find_cas_modules(wrapped)[0]
    assert module.route_state is None
    y = torch.tensor([1, 2])
    with casify.route(wrapped, labels=y):
        assert module.route_state[0] == "labels" and torch.equal(module.route_state[1], y)
        with casify.route(wrapped, labels=None):
            assert module.route_state == ("predicted", None)
        assert module.route_state[0] == "labels"
    assert module.route_state is None
    assert module.set_route(("predicted", None)) is None and module.set_route(None) == ("predicted", None)
    with pytest.raises(ValueError):
        module.set_route(("labels", None))


def test_a_router_replaces_the_routing_and_copies_leave_it_out(tiny_net):
    wrapped = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8)).eval()
    module = casify.find_cas_modules(wrapped)[0]
    x = torch.rand(2, 3, 8, 8)
    seen = []

    def always_zero(aux):
        seen.append(module.routing_for(aux))
        return torch.zeros(aux.shape[0], dtype=torch.long)

    assert module.set_router(always_zero) is None and module.router is always_zero
    routed = wrapped(x)
    assert len(seen) == 1 and copy.deepcopy(module).router is None
    assert module.set_router(None) is always_zero
    with casify.route(wrapped, labels=torch.zeros(2, dtype=torch.long)):
        torch.testing.assert_close(wrapped(x), routed, rtol=0, atol=0)
