"""Routing echo (casify.evaluate.routing_echo): a model whose later layers read the routed class off the mask follows
a forced route; one that ignores the mask does not."""
import pytest
import torch
from torch import nn

import casify
from casify.evaluate import routing_echo


class EchoNet(nn.Module):
    """Features whose pooled value is the one-hot class; the head reads the (masked) features. With a CAS module whose
    weight rows are one-hot, the masked features *are* the routed class: a perfect echo."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(classes, classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(classes))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _data(n=40, classes=4):
    y = torch.arange(n) % classes
    x = torch.nn.functional.one_hot(y, classes).float()[:, :, None, None].expand(n, classes, 2, 2).clone()
    return torch.utils.data.TensorDataset(x * 0.5 + 0.25, y)


def test_a_mask_the_model_reads_is_an_echo():
    model = casify.wrap(EchoNet(), layers=["features"], input_size=(4, 2, 2), normalize=None)
    with torch.no_grad():
        casify.find_cas_modules(model)[0].classifier.weight.copy_(torch.eye(4))
    echo = routing_echo(model, _data(), eps=0.01, steps=2, max_examples=40)
    assert echo.forced_all == 1.0 and echo.echoes
    assert echo.head_agreement_clean == [1.0] and echo.chance == 0.25
    assert set(echo.forced_each) == set(echo.modules) and echo.n == 40


def test_a_mask_the_model_ignores_is_no_echo():
    model = casify.wrap(EchoNet(), layers=["features"], input_size=(4, 2, 2), normalize=None, suppress=False)
    echo = routing_echo(model, _data(), eps=0.01, steps=2)
    assert echo.forced_all == 0.0 and not echo.echoes  # the model keeps its own (correct) answer
    assert echo.forced_null == 0.0  # its own prediction never is the drawn wrong class: the real null, not 1/classes


def test_the_forced_routing_null_is_the_rate_of_the_models_own_prediction():
    """A mask-ignoring model that is always wrong in one fixed way outputs the drawn wrong class about 1/(classes-1)
    of the time, and forced routing does no better than that null."""
    model = casify.wrap(EchoNet(), layers=["features"], input_size=(4, 2, 2), normalize=None, suppress=False)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(4).roll(1, dims=0))  # predicts (y + 1) % 4: never right
    echo = routing_echo(model, _data(n=300), eps=0.01, steps=1, max_examples=300)
    assert echo.forced_all == echo.forced_null and 0.2 < echo.forced_null < 0.47


def test_unrouted_models_are_refused():
    with pytest.raises(ValueError, match="routed"):
        routing_echo(casify.wrap(EchoNet(), layers=[], input_size=(4, 2, 2), normalize=None), _data())


def test_reports_and_model_cards_show_the_echo(tmp_path):
    from casify.evaluate import evaluate
    model = casify.wrap(EchoNet(), layers=["features"], input_size=(4, 2, 2), normalize=None)
    with torch.no_grad():
        casify.find_cas_modules(model)[0].classifier.weight.copy_(torch.eye(4))
    report = evaluate(model, _data(16), attacks=["fgsm"], eps=0.01, progress=False)
    assert report.routing_echo["forced_all"] == 1.0
    assert "## Routing echo" in report.to_markdown()
    assert report.summary()["routing_echo_forced"] == 1.0
    casify.write_hub_folder(model, tmp_path / "card", "echo-test", evaluation=report.summary())
    text = (tmp_path / "card" / "README.md").read_text()
    assert "Routing echo" in text and "100.0 %" in text
    plain = casify.wrap(EchoNet(), layers=[], input_size=(4, 2, 2), normalize=None)
    assert evaluate(plain, _data(8), attacks=["fgsm"], eps=0.01, progress=False).routing_echo is None
