"""RobustBench's conventions without robustbench: ``benchmark`` returns (clean, robust) with the adaptive worst case,
the model-info JSON has RobustBench's field names plus casify's, and the corruptions are generated locally and seeded.
Tiny nets on generated 8x8 images (offline)."""
import json

import numpy as np
import pytest
import torch

from casify.data.corruptions import ALL, CORRUPTIONS, CorruptedDataset, corrupt, load_cifar10c
from casify.evaluate import benchmark, benchmark_info, corruption_accuracy, evaluate
from casify.evaluate.benchmark import MODEL_INFO_FIELDS
from conftest import fit_small_convnet, separable_data

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4


@pytest.fixture(scope="module")
def model():
    return fit_small_convnet(seed=0, steps=60, num_classes=CLASSES)


@pytest.fixture(scope="module")
def data():
    return separable_data(12, 1, CLASSES)


def test_linf_benchmark_is_robustbench_shaped_with_the_adaptive_number(model, data, tmp_path):
    # 16/255 on 8 images: AutoAttack's APGD-CE settles most examples at once, so the test stays short
    clean, robust = benchmark(model, n_examples=8, dataset=data, threat_model="Linf", eps=16 / 255, attacks="quick",
                              progress=False, model_name="tiny", to_disk=True, model_info_dir=tmp_path)
    info = json.loads((tmp_path / "tensors" / "Linf" / "tiny.json").read_text())
    assert set(MODEL_INFO_FIELDS) <= set(info)  # RobustBench's ModelInfo, field for field
    assert info["clean_acc"] == str(round(100 * clean, 2)) and info["eps"] == pytest.approx(16 / 255)
    c = info["casify"]
    assert c["clean_acc"] == clean and c["robust_acc"] == robust and c["n_examples"] == 8
    # the adaptive worst case covers AutoAttack too: never above AutoAttack's own number, nor the suite's
    assert robust <= float(info["autoattack_acc"]) / 100 + 1e-9 and robust <= c["suite_worst_case"]
    assert c["autoattack_minus_adaptive_points"] == pytest.approx(float(info["autoattack_acc"]) - 100 * robust,
                                                                  abs=0.011)
    assert set(c["checks"]) >= {"eps_monotone", "pgd_beats_noise"} and "gradient_masking_suspected" in c
    x, y = data[0][:8], data[1][:8]
    suite = evaluate(model, (x, y), attacks="quick", eps=16 / 255, progress=False)
    assert c["data_sha256"] == suite.data["sha256"] and c["suite_worst_case"] == suite.worst_case["accuracy"]
    report = tmp_path / "tensors" / "Linf" / "tiny.eval"
    assert {"eval_report.json", "robustness_curve.png", "attacks.png"} <= {p.name for p in report.iterdir()}


def test_l2_benchmark_needs_an_eps_off_the_leaderboards(model, data):
    with pytest.raises(ValueError, match="give eps="):
        benchmark(model, n_examples=4, dataset=data, threat_model="L2", progress=False)
    info = benchmark_info(model, n_examples=6, dataset=data, threat_model="l2", eps=0.5, attacks=["pgd20"],
                          autoattack=False, progress=False)
    assert info["casify"]["threat_model"] == "L2" and info["autoattack_acc"] is None
    assert info["casify"]["eps_str"] == "0.5" and 0 <= info["casify"]["robust_acc"] <= info["casify"]["clean_acc"]
    # --no-autoattack: robust accuracy is the suite's alone, and says so
    definition = info["casify"]["robust_acc_definition"]
    assert "AutoAttack not run" in definition and "and AutoAttack" not in definition


def test_corruptions_are_seeded_per_image_and_stay_images():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in ALL:
        for severity in (1, 5):
            out = corrupt(x, name, severity, seed=0, index=4)
            assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1, name
            assert torch.equal(out, corrupt(x, name, severity, seed=0, index=4)), name  # reproducible
            assert not torch.equal(out, x), name
    noisy = corrupt(x, "gaussian_noise", 3, seed=0, index=4)
    assert not torch.equal(noisy, corrupt(x, "gaussian_noise", 3, seed=1, index=4))
    assert not torch.equal(noisy, corrupt(x, "gaussian_noise", 3, seed=0, index=5))
    grey = torch.full((3, 32, 32), 0.5)
    spread = [float((corrupt(grey, "gaussian_noise", s) - grey).std()) for s in (1, 2, 3, 4, 5)]
    assert spread == sorted(spread) and spread[0] == pytest.approx(0.04, rel=0.1)  # CIFAR-10-C's sigmas
    assert float(corrupt(grey, "contrast", 5).std()) == 0.0  # contrast keeps a flat image flat
    with pytest.raises(ValueError, match="not generated"):
        corrupt(x, "frost", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)


def test_corrupted_dataset_does_not_depend_on_the_order_it_is_read(data):
    x, y = data
    dataset = CorruptedDataset(torch.utils.data.TensorDataset(x, y), "shot_noise", 2, seed=3)
    assert torch.equal(dataset[5][0], corrupt(x[5], "shot_noise", 2, seed=3, index=5)) and dataset[5][1] == y[5]
    batched = next(iter(torch.utils.data.DataLoader(dataset, batch_size=7)))[0]
    assert torch.equal(batched[5], dataset[5][0])


def test_corruption_benchmark_is_the_mean_over_corruptions_and_severities(model, data, tmp_path):
    names = ["gaussian_noise", "contrast", "jpeg_compression"]
    clean, robust = benchmark(model, n_examples=12, dataset=data, threat_model="corruptions", corruptions=names,
                              progress=False, model_name="tiny", to_disk=True, model_info_dir=tmp_path)
    info = json.loads((tmp_path / "tensors" / "corruptions" / "tiny.json").read_text())
    table = info["casify"]["corruptions"]["per_corruption"]
    assert list(table) == names and all(list(t) == ["1", "2", "3", "4", "5"] for t in table.values())
    values = [a for t in table.values() for a in t.values()]
    assert robust == pytest.approx(sum(values) / 15) and info["corruptions_acc"] == str(round(100 * robust, 2))
    assert info["autoattack_acc"] is None and info["clean_acc"] == str(round(100 * clean, 2))
    assert "generated by casify.data.corruptions" in info["casify"]["corruptions"]["source"]
    assert set(CORRUPTIONS) <= set(ALL) and len(CORRUPTIONS) == 10


def test_released_cifar10c_arrays_are_read_by_severity(model, tmp_path):
    """CIFAR-10-C's layout: <name>.npy holds the test set at severity 1..5 in turn; labels.npy alongside."""
    n = 6
    x, y = separable_data(n, 1, CLASSES)
    clean = (x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    blank = np.zeros_like(clean)
    np.save(tmp_path / "contrast.npy", np.concatenate([clean, blank, blank, blank, blank]))
    np.save(tmp_path / "labels.npy", np.tile(y.numpy(), 5))
    image, label = load_cifar10c(tmp_path, "contrast", 1)[2]
    assert torch.allclose(image, torch.from_numpy(clean[2]).permute(2, 0, 1).float() / 255) and label == int(y[2])
    assert float(load_cifar10c(tmp_path, "contrast", 3)[2][0].abs().sum()) == 0.0
    table = corruption_accuracy(model, torch.utils.data.TensorDataset(x, y), corruptions=["contrast"],
                                corruptions_dir=tmp_path)["per_corruption"]["contrast"]
    quantised = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255
    assert table["1"] == float((model(quantised).argmax(1) == y).float().mean())
    black = float((model(torch.zeros(n, 3, 8, 8)).argmax(1) == y).float().mean())
    assert table["2"] == table["5"] == black


def test_cli_benchmark_writes_the_model_info(tmp_path, capsys):
    import timm

    import casify
    from casify_cli import main
    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet18", num_classes=CLASSES, width=0.125)
    casify.wrap(base, layers=[], input_size=(3, 8, 8), normalize=None).save_pretrained(tmp_path / "net")
    x, y = separable_data(8, 1, CLASSES)
    np.savez(tmp_path / "test8.npz", x=(x.permute(0, 2, 3, 1).numpy() * 255).astype("uint8"), y=y.numpy())
    assert main(["benchmark", str(tmp_path / "net"), "--data", str(tmp_path / "test8.npz"), "--threat-model",
                 "corruptions", "--corruptions", "contrast", "--n-examples", "8", "--no-progress",
                 "--model-info-dir", str(tmp_path / "info")]) == 0
    info = json.loads((tmp_path / "info" / "test8" / "corruptions" / "net.json").read_text())
    assert info["name"] == "net" and info["casify"]["n_examples"] == 8
    # RobustBench's fields name the architecture and the dataset, not casify's wrapper class or a path
    assert info["architecture"] == "cifar_resnet18" and info["dataset"] == "test8"
    assert f"clean {100 * info['casify']['clean_acc']:.2f} %" in capsys.readouterr().out
