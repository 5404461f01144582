"""The silent mistakes at an attack's entry are errors: 0..255 pixels, eps=8, integer images, labels out of range."""
import pytest
import torch
from torch import nn

import casify
from casify.attacks import Attack, fgsm, pgd
from casify.core.host_sync import HostSyncCounter


def _plain(num_classes=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, num_classes))
    model.num_classes = num_classes
    return model.eval()


def test_pixels_outside_unit_range_are_refused_with_the_fix():
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="divide by 255"):
        pgd(_plain(), x * 255, y, eps=8 / 255, steps=1)
    with pytest.raises(ValueError, match="already normalised"):
        pgd(_plain(), (x - 0.5) / 0.25, y, eps=8 / 255, steps=1)


def test_eps_above_one_suggests_pixel_units_and_strings_are_read():
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="8/255"):
        pgd(_plain(), x, y, eps=8, steps=1)
    adv = pgd(_plain(), x, y, eps="8/255", steps=2)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert Attack(eps="4/255").eps == pytest.approx(4 / 255)
    adv = fgsm(_plain(), x, y, eps="2/255")
    assert (adv - x).abs().max() <= 2 / 255 + 1e-6


def test_integer_images_name_the_conversion():
    x = (torch.rand(2, 3, 8, 8) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"x.float\(\) / 255"):
        pgd(_plain(), x, torch.tensor([0, 1]), steps=1)


def test_labels_out_of_range_get_the_same_message_as_route():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\] \(the model has 4 classes\)"):
        pgd(_plain(), x, torch.tensor([0, 7]), steps=1)
    wrapped = casify.wrap(_plain(), ["1"], input_size=(3, 8, 8)).eval()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]") as from_pgd:
        pgd(wrapped, x, torch.tensor([0, 7]), steps=1)
    with pytest.raises(ValueError) as from_route:
        with casify.route(wrapped, labels=torch.tensor([0, 7])):
            pass
    assert str(from_pgd.value) == str(from_route.value)
    with pytest.raises(ValueError, match="labels must lie in"):
        pgd(_plain(), x, torch.tensor([-1, 0]), steps=1)


def test_the_checks_make_no_host_sync_where_reads_would_wait(monkeypatch):
    monkeypatch.setattr("casify.core.host_sync.SYNC_FREE_DEVICES", ())
    from casify.core.inputs import check_images, check_labels
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with HostSyncCounter() as syncs:
        check_images(x)
        check_labels(y, 4)
    assert syncs.count == 0
    with pytest.raises(RuntimeError):  # the device-side assertion fires (on CPU it runs at once)
        check_images(x * 255)


def test_evaluate_reads_eps_as_the_readme_writes_it():
    from casify.evaluate import evaluate
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    report = evaluate(_plain(), (x, y), attacks="quick", eps="4/255", eps_sweep=["2/255"], progress=False,
                      checks=False)
    assert report.summary()["eps_str"] == "4/255"
    with pytest.raises(ValueError, match="8/255"):
        evaluate(_plain(), (x, y), attacks="quick", eps=8, progress=False, checks=False)
