"""Tests of the point-cloud experiment's data and model: generated shapes, outliers, PointNet."""
from __future__ import annotations

import math

import pytest
import torch

from convexddn.errors import OptionError, ShapeError
from convexddn.experiments.pointcloud import add_outliers
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


def _dumbbell_residual(p):
    # Signed distance to the union of the two balls (radius 0.45 at x = ±0.85) and the
    # bar (radius 0.15 along x, |x| ≤ 0.85): zero on the union's surface, negative inside.
    balls = [(p - torch.tensor([cx, 0.0, 0.0])).norm(dim=1) - 0.45 for cx in (-0.85, 0.85)]
    d = torch.stack((p[:, 1:].norm(dim=1) - 0.15, p[:, 0].abs() - 0.85), dim=1)
    bar = d.amax(dim=1).clamp_max(0.0) + d.clamp_min(0.0).norm(dim=1)
    return torch.stack(balls + [bar], dim=1).amin(dim=1)


_SURFACES = {
    "dumbbell": _dumbbell_residual,
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


def test_sample_surface_area_weighting_dumbbell():
    # Bar between the balls' surfaces: length 2(0.85 - w), w = sqrt(0.45² - 0.15²); each
    # ball without the disc the bar enters: area 2π·0.45·(0.45 + w).
    w = math.sqrt(0.45**2 - 0.15**2)
    bar, ball = 2 * math.pi * 0.15 * 2 * (0.85 - w), 2 * math.pi * 0.45 * (0.45 + w)
    p = sample_surface("dumbbell", 40000, torch.Generator().manual_seed(0))
    on_bar = (p[:, 0].abs() < 0.85 - w + 1e-6).double().mean()
    assert abs(float(on_bar) - bar / (bar + 2 * ball)) < 0.01


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
    # A positive rate too small to replace one of the 40 points is refused, not a no-op.
    with pytest.raises(OptionError, match=r"0\.01 \(1 %\) with n_points=40"):
        add_outliers(x, 0.01, torch.Generator())


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


# --------------------------------------------------------------------------- audit fixes


@pytest.mark.parametrize("options", [
    dict(noise=float("nan")), dict(noise=float("inf")), dict(noise="x"), dict(noise=None),
    dict(seed=1.7), dict(seed="abc"), dict(seed=None), dict(n_per_class=True),
])
def test_make_dataset_refuses_bad_options(options):
    # NaN/inf noise gave NaN clouds; seed=1.7 was read as 1; the others raised raw errors.
    with pytest.raises(OptionError, match=next(iter(options))):  # the option is named
        make_dataset(**{"n_per_class": 1, "n_points": 8, **options})


def test_sample_surface_refuses_no_points():
    with pytest.raises(OptionError, match="n_points"):
        sample_surface("cube", 0, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options", [dict(num_classes=2.5), dict(num_classes=10, dropout=2), dict(num_classes=10, dropout=-0.1)])
def test_pointnet_refuses_bad_sizes(options):
    # 2.5 classes were truncated to 2; dropout=2 a raw ValueError.
    with pytest.raises(OptionError, match=list(options)[-1]):
        PointNet(**options)


def test_make_dataset_classes_is_a_list_of_names():
    # One name ("sphere") was split into letters and reported as 's'.
    with pytest.raises(OptionError, match="classes must be a list or tuple of names"):
        make_dataset(1, 8, classes="sphere")


def test_test_outlier_seeds_distinct_across_seeds_and_rates():
    # Seed s's rate i and seed s + 1's rate i - 1 once shared their outliers (seed + offset + i).
    from convexddn.experiments.pointcloud.protocol import outlier_seed

    seeds = {outlier_seed(s, i) for s in range(50) for i in range(10)}
    assert len(seeds) == 500
