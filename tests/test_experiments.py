"""Tests of the point-cloud experiment: shape generator, PointNet, protocol, metrics, run."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from convexddn.errors import OptionError, ShapeError
from convexddn.experiments import pointcloud
from convexddn.experiments.pointcloud import (
    Config,
    add_outliers,
    average_precision,
    mean_average_precision,
    run,
)
from convexddn.experiments.pointnet import POOLINGS, PointNet, PointPool
from convexddn.experiments.shapes import CLASSES, make_dataset, sample_surface

# ---------------------------------------------------------------------------- shapes


def test_make_dataset_deterministic_by_seed():
    a_x, a_y = make_dataset(3, 64, seed=7)
    b_x, b_y = make_dataset(3, 64, seed=7)
    c_x, _ = make_dataset(3, 64, seed=8)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert not torch.allclose(a_x, c_x)


def test_make_dataset_shapes_in_unit_ball_and_centred():
    x, y = make_dataset(4, 100, seed=0)
    assert x.shape == (4 * len(CLASSES), 100, 3) and x.dtype == torch.float32
    assert y.shape == (4 * len(CLASSES),) and y.dtype == torch.int64
    radius = x.norm(dim=-1).amax(dim=-1)
    # The farthest point of each cloud is on the unit sphere, none outside it.
    torch.testing.assert_close(radius, torch.ones_like(radius), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.mean(dim=1), torch.zeros(len(x), 3), atol=1e-5, rtol=0)


def test_make_dataset_class_balance_and_shuffled():
    _, y = make_dataset(5, 16, seed=1)
    assert torch.bincount(y, minlength=len(CLASSES)).tolist() == [5] * len(CLASSES)
    # Shuffled: taking batches in order must not give one class per batch.
    assert not torch.equal(y, torch.sort(y).values)


def test_make_dataset_subset_of_classes():
    x, y = make_dataset(2, 8, seed=0, classes=("torus", "disk"))
    assert x.shape == (4, 8, 3) and sorted(y.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_per_class=0),
        dict(n_per_class=2, n_points=0),
        dict(n_per_class=2, classes=("sphere", "banana")),
        dict(n_per_class=2, classes=("sphere", "sphere")),
        dict(n_per_class=2, noise=-0.1),
    ],
)
def test_make_dataset_invalid(kwargs):
    with pytest.raises(OptionError):
        make_dataset(**kwargs)


# Implicit equations of the canonical surfaces (residual 0 on the surface), derived from
# the dimensions documented in shapes.py.
def _cylinder_residual(p):
    r = p[:, :2].norm(dim=1)
    side = (r - 0.6).abs() + torch.relu(p[:, 2].abs() - 1.0)
    cap = (p[:, 2].abs() - 1.0).abs() + torch.relu(r - 0.6)
    return torch.minimum(side, cap)


_SURFACES = {
    "sphere": lambda p: p.norm(dim=1) - 1.0,
    "cube": lambda p: p.abs().amax(dim=1) - 1.0,
    "torus": lambda p: (p[:, :2].norm(dim=1) - 1.0).hypot(p[:, 2]) - 0.35,
    "ellipsoid": lambda p: (p / torch.tensor([1.0, 0.65, 0.4])).norm(dim=1) - 1.0,
    "disk": lambda p: p[:, 2].abs() + torch.relu(p[:, :2].norm(dim=1) - 1.0),
    "cylinder": _cylinder_residual,
}


@pytest.mark.parametrize("name", sorted(_SURFACES))
def test_sample_surface_on_surface(name):
    p = sample_surface(name, 2000, torch.Generator().manual_seed(0))
    assert p.shape == (2000, 3)
    assert _SURFACES[name](p).abs().max() < 1e-5


def test_sample_surface_area_weighting_cylinder():
    # Side area 2π·0.6·2 = 2.4π, caps 2·π·0.36 = 0.72π: the side holds 2.4/3.12 of the points.
    p = sample_surface("cylinder", 20000, torch.Generator().manual_seed(0))
    on_side = (p[:, 2].abs() < 1.0 - 1e-6).double().mean()
    assert abs(float(on_side) - 2.4 / 3.12) < 0.02


@pytest.mark.parametrize("name", CLASSES)
def test_sample_surface_every_class_spreads_in_3d(name):
    p = sample_surface(name, 500, torch.Generator().manual_seed(0))
    assert torch.isfinite(p).all()
    extent = p.amax(dim=0) - p.amin(dim=0)
    # Every shape extends in x and y; only the disk is flat in z.
    assert (extent[:2] > 0.5).all()
    assert (extent[2] > 0.5) == (name != "disk")


def test_pose_rotates_about_vertical_axis_only():
    # A flat horizontal disk stays flat after posing iff every rotation is about z.
    x, _ = make_dataset(6, 200, seed=3, classes=("disk",), noise=0.0)
    assert x[..., 2].abs().max() < 1e-5
    # ... and the rotations are not all the identity: the disks' anisotropy axes differ.
    cov = torch.einsum("bni,bnj->bij", x[..., :2], x[..., :2])
    angle = 0.5 * torch.atan2(2 * cov[:, 0, 1], cov[:, 0, 0] - cov[:, 1, 1])
    assert angle.std() > 0.1


# ---------------------------------------------------------------------------- outliers


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_add_outliers_replaces_exact_fraction(rate):
    x, _ = make_dataset(2, 50, seed=0)
    before = x.clone()
    y = add_outliers(x, rate, torch.Generator().manual_seed(1))
    assert torch.equal(x, before)  # input untouched
    changed = (y != x).any(dim=-1)
    expected = round(rate * 50)
    assert changed.sum(dim=1).tolist() == [expected] * len(x)
    # Points not replaced are exactly the originals; replacements lie in the unit ball.
    assert torch.equal(y[~changed], x[~changed])
    assert (y[changed].norm(dim=-1) <= 1.0 + 1e-6).all()


def test_add_outliers_uniform_in_ball():
    y = add_outliers(torch.full((1, 20000, 3), 5.0), 1.0, torch.Generator().manual_seed(0))
    r = y[0].norm(dim=-1)
    # Uniform in the ball: P(r < 1/2) = (1/2)³ = 1/8, and each coordinate has mean 0.
    assert abs(float((r < 0.5).double().mean()) - 0.125) < 0.015
    assert y[0].mean(dim=0).abs().max() < 0.03


def test_add_outliers_deterministic_and_invalid():
    x, _ = make_dataset(1, 40, seed=0)
    a = add_outliers(x, 0.5, torch.Generator().manual_seed(4))
    b = add_outliers(x, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    for bad in (-0.1, 1.5):
        with pytest.raises(OptionError):
            add_outliers(x, bad, torch.Generator())


# ------------------------------------------------------------------------------ model


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pointnet_forward_shapes(pooling):
    torch.manual_seed(0)
    model = PointNet(num_classes=10, pooling=pooling)
    x = torch.rand(4, 3, 64) * 2 - 1
    logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.features.parameters()]
    # The gradient reaches the per-point MLP through the pooling layer.
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    assert model(x[:1]).shape == (1, 10)


def test_pooling_adds_no_parameters():
    counts = {p: sum(t.numel() for t in PointNet(10, pooling=p).parameters()) for p in POOLINGS}
    assert len(set(counts.values())) == 1


@pytest.mark.parametrize("pooling", POOLINGS)
def test_point_pool_of_constant_is_the_constant(pooling):
    # Every penalty has its minimum at zero residual, so a constant signal pools to itself.
    x = torch.linspace(-2, 2, 6).view(2, 3, 1).expand(2, 3, 9).contiguous()
    torch.testing.assert_close(PointPool(pooling)(x), x[..., 0], atol=1e-4, rtol=0)


def test_point_pool_closed_forms():
    x = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(PointPool("max")(x), x.amax(dim=-1))
    torch.testing.assert_close(PointPool("mean")(x), x.mean(dim=-1))
    # argmin_u Σ (u - x_i)² / 2 is the mean.
    torch.testing.assert_close(PointPool("quadratic")(x), x.mean(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("penalty", ["welsch", "trunc_quad"])
def test_point_pool_robust_ignores_far_outlier(penalty):
    # Nine points at 0 and one at 100: a redescending penalty pools to 0, the mean to 10.
    x = torch.zeros(1, 1, 10)
    x[..., -1] = 100.0
    assert PointPool(penalty)(x).abs().max() < 1e-3
    assert PointPool("mean")(x).item() == pytest.approx(10.0)


def test_pointnet_invalid():
    with pytest.raises(OptionError):
        PointNet(10, pooling="median")
    with pytest.raises(OptionError):
        PointPool("welsch", alpha=0.0)
    with pytest.raises(ShapeError):
        PointNet(10)(torch.zeros(2, 64, 3))


# ----------------------------------------------------------------------------- metrics


def test_map_perfect_scores_is_one():
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    scores = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.rand(6, 3)
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)


def test_map_constant_scores_is_prevalence():
    # All scores tied: a single threshold, precision = class prevalence.
    labels = torch.tensor([0, 0, 0, 1])
    ap = average_precision(torch.zeros(4, 2), labels)
    torch.testing.assert_close(ap, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert mean_average_precision(torch.zeros(4, 2), labels) == pytest.approx(0.5)


def test_map_hand_computed_rankings():
    labels = torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9], [0.6, 0.0]])
    # Class 0 ranking (by score): samples 0 (+), 1 (-), 2 (+), 3 (-):
    #   AP = (1/1 + 2/3) / 2 = 5/6.
    # Class 1 ranking: samples 2 (-), 1 (+), 0 (-), 3 (+): AP = (1/2 + 2/4) / 2 = 1/2.
    ap = average_precision(scores, labels)
    torch.testing.assert_close(ap, torch.tensor([5 / 6, 1 / 2], dtype=torch.float64))
    assert mean_average_precision(scores, labels) == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_map_reversed_ranking_and_ties():
    # Positives ranked last among four: AP = (1/3 + 2/4) / 2 = 5/12.
    labels = torch.tensor([1, 1, 0, 0])
    scores = torch.tensor([[0.0, 0.1], [0.0, 0.2], [0.0, 0.9], [0.0, 0.8]])
    assert average_precision(scores, labels)[1].item() == pytest.approx(5 / 12)
    # Ties between a positive and a negative share the precision of the whole group:
    # scores (+ 0.9), (- 0.5), (+ 0.5): precisions 1/1 and 2/3 -> AP = 5/6.
    labels = torch.tensor([1, 0, 1])
    scores = torch.tensor([[0.0, 0.9], [0.0, 0.5], [0.0, 0.5]])
    assert average_precision(scores, labels)[1].item() == pytest.approx(5 / 6)


def test_map_invalid_shapes():
    with pytest.raises(ShapeError):
        average_precision(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError):
        average_precision(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


def test_map_absent_class_is_excluded():
    labels = torch.tensor([0, 0, 1, 1])  # class 2 never occurs
    scores = torch.tensor([[1.0, 0, 0], [0.9, 0, 0], [0, 1.0, 0], [0, 0.9, 0]])
    ap = average_precision(scores, labels)
    assert math.isnan(ap[2].item())
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)


# ------------------------------------------------------------------------- evaluation


def test_evaluate_uses_running_statistics():
    # In eval mode a cloud's score cannot depend on which clouds share its batch.
    torch.manual_seed(0)
    model = PointNet(10)
    model.train()
    model(torch.randn(8, 3, 32))  # move the running statistics away from their init
    x, y = make_dataset(2, 32, seed=0)
    cfg1 = Config.quick(eval_batch_size=1)
    cfg2 = Config.quick(eval_batch_size=7)
    cpu = torch.device("cpu")
    assert pointcloud._evaluate(model, x, y, cfg1, cpu) == pytest.approx(
        pointcloud._evaluate(model, x, y, cfg2, cpu)
    )


# --------------------------------------------------------------------------- end to end


def _tiny(tmp_path, **kw) -> Config:
    return Config(
        poolings=pointcloud.DEFAULT_POOLINGS, n_points=32, train_per_class=2, test_per_class=1,
        epochs=1, batch_size=10, out=str(tmp_path), progress=False, preset="tiny", **kw,
    )


def test_run_writes_every_row(tmp_path, capsys):
    cfg = _tiny(tmp_path)
    result = run(cfg)
    with open(tmp_path / "pointcloud.json") as f:
        saved = json.load(f)
    rows = {(r["pooling"], round(r["rate"], 6)) for r in saved["rows"]}
    expected = {(p, round(r, 6)) for p in cfg.poolings for r in pointcloud.DEFAULT_RATES}
    assert rows == expected and len(saved["rows"]) == len(expected)
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["map"] <= 1.0 for r in saved["rows"])
    assert all(r["train_rate"] == 0.0 for r in saved["rows"])
    assert saved["protocol"] == "test_outliers_only" and saved["n_test"] == len(CLASSES)
    assert saved["machine"]["torch"] == torch.__version__
    assert (tmp_path / "pointcloud.png").stat().st_size > 1000
    assert result["rows"] == saved["rows"]
    table = pointcloud.format_table(result)
    assert "| 90 % |" in table and "trunc. quad." in table and "Welsch" in table


def test_run_train_outliers_same_rate(tmp_path):
    cfg = _tiny(tmp_path, train_outliers=True, rates=(0.0, 0.5))
    cfg.poolings = ("max", "welsch")
    result = run(cfg)
    assert {(r["pooling"], r["rate"], r["train_rate"]) for r in result["rows"]} == {
        ("max", 0.0, 0.0), ("max", 0.5, 0.5), ("welsch", 0.0, 0.0), ("welsch", 0.5, 0.5),
    }
    assert [(m["pooling"], m["train_rate"]) for m in result["models"]] == [
        ("max", 0.0), ("max", 0.5), ("welsch", 0.0), ("welsch", 0.5)]
    assert all(m["train_seconds"] > 0 and m["eval_seconds"] > 0 for m in result["models"])
    assert result["protocol"] == "train_and_test_outliers"


def test_run_is_deterministic(tmp_path):
    cfg = _tiny(tmp_path, rates=(0.0, 0.3))
    cfg.poolings = ("max",)
    cfg.out = None
    a, b = run(cfg), run(cfg)
    assert a["rows"] == b["rows"] and "files" not in a


def test_run_learns_clean_shapes():
    # A few epochs on clean data must beat chance (10 %) by a wide margin.
    cfg = Config(poolings=("max",), rates=(0.0,), n_points=64, train_per_class=10,
                 test_per_class=5, epochs=4, batch_size=10, lr=3e-3, out=None, progress=False)
    acc = run(cfg)["rows"][0]["accuracy"]
    assert acc > 0.3


def test_main_cli_entry(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    pointcloud.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--seed", "3", "--epochs", "1",
                              "--poolings", "max,mean", "--threads", "1", "--train-outliers"])
    cfg = pointcloud.config_from_args(args)
    assert (cfg.preset, cfg.seed, cfg.epochs, cfg.poolings, cfg.threads, cfg.train_outliers) == (
        "quick", 3, 1, ("max", "mean"), 1, True)
    assert pointcloud.config_from_args(parser.parse_args([])) == Config(preset="default")
    assert pointcloud.config_from_args(parser.parse_args(["--rates", "0,10,90"])).rates == (
        0.0, 0.1, 0.9)
    with pytest.raises(OptionError):
        pointcloud.config_from_args(parser.parse_args(["--rates", "0,ten"]))
    # Keep the CLI test tiny: shrink the quick preset's data.
    monkeypatch.setattr(
        pointcloud, "config_from_args",
        lambda a: Config.quick(poolings=("max", "mean"), out=str(tmp_path), n_points=16,
                               train_per_class=2, test_per_class=1, progress=False),
    )
    assert pointcloud.main(args) == 0
    out = capsys.readouterr().out
    assert "Top-1 accuracy (%)" in out and "| 0 % |" in out and "| 90 % |" in out
    assert (tmp_path / "pointcloud.json").exists()


@pytest.mark.parametrize(
    "kw",
    [
        dict(poolings=("max", "median")),
        dict(poolings=()),
        dict(rates=(0.0, 1.0)),
        dict(epochs=0),
        dict(batch_size=1),
        dict(lr=-1.0),
        dict(device="tpu"),
    ],
)
def test_config_invalid(kw):
    with pytest.raises(OptionError):
        run(Config(out=None, progress=False, **kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_config_cuda_without_gpu():
    with pytest.raises(OptionError, match="CUDA"):
        run(Config(device="cuda", out=None, progress=False))


def test_run_counts_library_warnings(monkeypatch):
    import warnings

    from convexddn.errors import SolverWarning

    original = PointPool.forward

    def warning_forward(self, x):
        warnings.warn("did not converge", SolverWarning)
        return original(self, x)

    monkeypatch.setattr(PointPool, "forward", warning_forward)
    cfg = Config(poolings=("max",), rates=(0.0,), n_points=16, train_per_class=2, test_per_class=1,
                 epochs=1, batch_size=10, out=None, progress=False)
    result = run(cfg)
    # 20 training clouds in batches of 10: 2 training steps + 2 recalibration passes,
    # then 1 evaluation batch of the 10 test clouds: 5 pooling calls.
    assert result["models"][0]["warnings"] == {"SolverWarning": 5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_on_cuda(tmp_path):
    cfg = _tiny(tmp_path, device="cuda", rates=(0.0, 0.5))
    cfg.poolings = ("max", "welsch")
    result = run(cfg)
    assert len(result["rows"]) == 4 and result["machine"]["device"].startswith("cuda")
