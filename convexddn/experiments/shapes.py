"""A procedurally generated 3D shape dataset for the point-cloud experiment.

Each cloud is a set of points sampled on the surface of one of ten simple solids,
posed at random, with small noise, and normalised into the unit ball the way PointNet
normalises ModelNet clouds (centred on its mean, scaled so the farthest point is at
distance 1). Everything is generated with torch from one seed, in a batch per class;
there is nothing to download.

Per cloud:

1. ``N`` points on the canonical surface. Each surface is a union of parts (faces,
   caps, a tube, ...); every point picks a part with probability proportional to
   the part's area and then a point on that part, so sampling is (close to) uniform
   in area. The ellipsoid, made by stretching a sphere, is the one exception.
2. An independent scale per axis drawn from ``U(0.75, 1.25)`` (size and anisotropy).
3. A rotation about the vertical (z) axis by an angle drawn from ``U(0, 2π)``. Full
   3D rotations are not used: a small PointNet without T-nets learns them too slowly
   in a few CPU epochs.
4. Gaussian noise of standard deviation 0.01.
5. Centring on the mean and scaling into the unit ball.

Generation happens on the CPU with a seeded ``torch.Generator``, so a seed gives the
same clouds on every machine and device; move the result where it is needed.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

from .._checks import check_choices, check_int
from ..errors import OptionError

__all__ = ["CLASSES", "sample_surface", "make_dataset", "normalize_unit_ball"]

#: The shape classes, in label order.
CLASSES: tuple[str, ...] = (
    "sphere",
    "cube",
    "cylinder",
    "cone",
    "torus",
    "ellipsoid",
    "pyramid",
    "disk",
    "capsule",
    "dumbbell",
)

# A part sampler draws ``n`` points on one piece of a surface: (n, generator) -> (n, 3).
_Part = Callable[[int, torch.Generator], torch.Tensor]


# ----------------------------------------------------------------------------- parts


def _uniform(n: int, g: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _sphere_part(radius: float, center: Sequence[float] = (0.0, 0.0, 0.0)) -> _Part:
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        # A normalised Gaussian vector is uniform on the sphere.
        v = torch.randn(n, 3, generator=g)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return radius * v + torch.tensor(center)

    return draw


def _cut_sphere_part(radius: float, center_x: float, x_low: float, x_high: float) -> _Part:
    """The zone of a sphere between two planes ``x = const`` (x relative to its centre)."""
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        # Archimedes: the coordinate along an axis of a uniform point on a sphere is
        # uniform, so a uniform x in [x_low, x_high] and angle sample the zone uniformly.
        x = _uniform(n, g, x_low, x_high)
        t = _uniform(n, g, 0.0, 2 * math.pi)
        rho = (radius * radius - x * x).clamp_min(0.0).sqrt()
        return torch.stack((x + center_x, rho * t.cos(), rho * t.sin()), dim=1)

    return draw


def _hemisphere_part(radius: float, z0: float, up: bool) -> _Part:
    sphere = _sphere_part(radius)

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        p = sphere(n, g)
        # Reflecting the lower half onto the upper one keeps the density uniform.
        z = p[:, 2].abs() if up else -p[:, 2].abs()
        return torch.stack((p[:, 0], p[:, 1], z + z0), dim=1)

    return draw


def _disk_part(radius: float, z: float) -> _Part:
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        # sqrt of a uniform radius fraction gives uniform density per unit area.
        r = radius * torch.rand(n, generator=g).sqrt()
        t = _uniform(n, g, 0.0, 2 * math.pi)
        return torch.stack((r * t.cos(), r * t.sin(), torch.full((n,), z)), dim=1)

    return draw


def _tube_part(radius: float, z_low: float, z_high: float, axis: int = 2) -> _Part:
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        t = _uniform(n, g, 0.0, 2 * math.pi)
        h = _uniform(n, g, z_low, z_high)
        a, b = radius * t.cos(), radius * t.sin()
        if axis == 2:
            return torch.stack((a, b, h), dim=1)
        return torch.stack((h, a, b), dim=1)  # a tube along x

    return draw


def _cone_side_part(radius: float, z_base: float, z_apex: float) -> _Part:
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        # The lateral area within distance s of the apex grows like s², hence the sqrt.
        s = torch.rand(n, generator=g).sqrt()
        t = _uniform(n, g, 0.0, 2 * math.pi)
        r = radius * s
        z = z_apex + (z_base - z_apex) * s
        return torch.stack((r * t.cos(), r * t.sin(), z), dim=1)

    return draw


def _triangle_part(a: Sequence[float], b: Sequence[float], c: Sequence[float]) -> _Part:
    A, B, C = torch.tensor(a), torch.tensor(b), torch.tensor(c)

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        # Uniform barycentric sampling (the sqrt folds the unit square onto the triangle).
        r1 = torch.rand(n, 1, generator=g).sqrt()
        r2 = torch.rand(n, 1, generator=g)
        return (1 - r1) * A + r1 * (1 - r2) * B + r1 * r2 * C

    return draw


def _cube_face_part(axis: int, sign: float) -> _Part:
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        p = 2 * torch.rand(n, 3, generator=g) - 1
        p[:, axis] = sign
        return p

    return draw


def _torus_part(major: float, minor: float) -> _Part:
    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        # Area density in the tube angle v is proportional to (R + r cos v): draw
        # candidates and keep the first accepted one (rejection sampling). With 8
        # candidates the chance that all are rejected is below 1 %, in which case
        # the first candidate is used; the bias is negligible for this purpose.
        k = 8
        v = _uniform(n * k, g, 0.0, 2 * math.pi).view(n, k)
        accept = torch.rand(n, k, generator=g) * (major + minor) <= major + minor * v.cos()
        first = accept.to(torch.int8).argmax(dim=1)  # 0 when none is accepted
        v = v.gather(1, first[:, None]).squeeze(1)
        u = _uniform(n, g, 0.0, 2 * math.pi)
        ring = major + minor * v.cos()
        return torch.stack((ring * u.cos(), ring * u.sin(), minor * v.sin()), dim=1)

    return draw


def _ellipsoid_part(axes: Sequence[float]) -> _Part:
    sphere = _sphere_part(1.0)

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        return sphere(n, g) * torch.tensor(axes)

    return draw


# ------------------------------------------------------------------------- surfaces


def _surface(name: str) -> list[tuple[float, _Part]]:
    """The parts of one canonical surface with their areas (the sampling weights)."""
    pi = math.pi
    if name == "sphere":
        return [(4 * pi, _sphere_part(1.0))]
    if name == "cube":
        return [(4.0, _cube_face_part(axis, s)) for axis in range(3) for s in (-1.0, 1.0)]
    if name == "cylinder":
        r, h = 0.6, 2.0
        return [
            (2 * pi * r * h, _tube_part(r, -h / 2, h / 2)),
            (pi * r * r, _disk_part(r, -h / 2)),
            (pi * r * r, _disk_part(r, h / 2)),
        ]
    if name == "cone":
        r, h = 1.0, 2.0
        return [
            (pi * r * math.hypot(r, h), _cone_side_part(r, -h / 2, h / 2)),
            (pi * r * r, _disk_part(r, -h / 2)),
        ]
    if name == "torus":
        R, r = 1.0, 0.35
        return [(4 * pi * pi * R * r, _torus_part(R, r))]
    if name == "ellipsoid":
        return [(1.0, _ellipsoid_part((1.0, 0.65, 0.4)))]
    if name == "pyramid":
        base = [(-1.0, -1.0, -1.0), (1.0, -1.0, -1.0), (1.0, 1.0, -1.0), (-1.0, 1.0, -1.0)]
        apex = (0.0, 0.0, 1.0)
        side = math.sqrt(5.0)  # base 2, slant height sqrt(1 + 2²)
        parts = [(side, _triangle_part(base[i], base[(i + 1) % 4], apex)) for i in range(4)]
        parts += [(2.0, _triangle_part(base[0], base[1], base[2]))]
        parts += [(2.0, _triangle_part(base[0], base[2], base[3]))]
        return parts
    if name == "disk":
        return [(pi, _disk_part(1.0, 0.0))]
    if name == "capsule":
        r, h = 0.45, 1.2
        return [
            (2 * pi * r * h, _tube_part(r, -h / 2, h / 2)),
            (2 * pi * r * r, _hemisphere_part(r, h / 2, up=True)),
            (2 * pi * r * r, _hemisphere_part(r, -h / 2, up=False)),
        ]
    if name == "dumbbell":
        # Two balls joined by a thin bar along x: the bar runs between the balls'
        # surfaces (it meets them at |x| = c - w) and each ball has the disc where the
        # bar enters cut away, so that no point lies inside the solid.
        rb, rs, c = 0.15, 0.45, 0.85
        w = math.sqrt(rs * rs - rb * rb)
        return [
            (2 * pi * rs * (rs + w), _cut_sphere_part(rs, -c, -rs, w)),
            (2 * pi * rs * (rs + w), _cut_sphere_part(rs, c, -w, rs)),
            (2 * pi * rb * 2 * (c - w), _tube_part(rb, -(c - w), c - w, axis=0)),
        ]
    raise OptionError(f"shape must be one of {list(CLASSES)}, got {name!r}")


def sample_surface(name: str, n_points: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n_points`` points on the canonical surface ``name`` (unposed, noiseless).

    Args:
        name: one of :data:`CLASSES`.
        n_points: number of points.
        generator: CPU ``torch.Generator`` that supplies all randomness.

    Returns:
        float32 tensor of shape ``(n_points, 3)``.
    """
    check_int("n_points", n_points, minimum=1)
    parts = _surface(name)
    areas = torch.tensor([a for a, _ in parts], dtype=torch.float64)
    if len(parts) == 1:
        return parts[0][1](n_points, generator)
    which = torch.multinomial(areas, n_points, replacement=True, generator=generator)
    out = torch.empty(n_points, 3)
    for i, (_, part) in enumerate(parts):
        mask = which == i
        m = int(mask.sum())
        if m:
            out[mask] = part(m, generator)
    return out


def normalize_unit_ball(points: torch.Tensor) -> torch.Tensor:
    """Centre each cloud on its mean and scale it so the farthest point has norm 1.

    Shape: ``(B, N, 3) -> (B, N, 3)``.
    """
    centred = points - points.mean(dim=-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=-1).clamp_min(1e-12)
    return centred / radius[..., None, None]


def _pose(points: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Random per-axis scale, rotation about z, and Gaussian noise. (B, N, 3) -> (B, N, 3)."""
    b = points.shape[0]
    scale = 0.75 + 0.5 * torch.rand(b, 1, 3, generator=g)
    theta = 2 * math.pi * torch.rand(b, generator=g)
    c, s = theta.cos(), theta.sin()
    zero, one = torch.zeros(b), torch.ones(b)
    # Rows of R; points are row vectors, so p' = p Rᵀ.
    rot = torch.stack(
        (torch.stack((c, -s, zero), 1), torch.stack((s, c, zero), 1), torch.stack((zero, zero, one), 1)),
        dim=1,
    )
    posed = (points * scale) @ rot.transpose(1, 2)
    return posed + noise * torch.randn(posed.shape, generator=g)


def make_dataset(
    n_per_class: int,
    n_points: int = 512,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    noise: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a balanced, shuffled set of labelled point clouds.

    Args:
        n_per_class: clouds per class.
        n_points: points per cloud (default 512).
        seed: the only source of randomness; the same seed gives the same tensors.
        classes: shape names from :data:`CLASSES`; label ``k`` is ``classes[k]``.
        noise: standard deviation of the Gaussian noise added to each coordinate.

    Returns:
        ``(points, labels)``: float32 ``(len(classes) * n_per_class, n_points, 3)``, each
        cloud inside the closed unit ball, and int64 labels of shape
        ``(len(classes) * n_per_class,)``. The order is shuffled so that batches taken in
        order mix the classes.

    Raises:
        OptionError: for a count or seed that is not an integer (counts >= 1), classes
            that are not a list of distinct known names, or a noise level that is not a
            finite number >= 0.
    """
    check_int("n_per_class", n_per_class, minimum=1)
    check_int("n_points", n_points, minimum=1)
    seed = check_int("seed", seed)  # 1.7 was read as 1
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < math.inf:
        raise OptionError(f"noise must be a finite number >= 0, got {noise!r}")
    check_choices("classes", classes, CLASSES)
    classes = list(classes)

    g = torch.Generator().manual_seed(seed)
    clouds = []
    for name in classes:
        # One batched draw per class: all its clouds' points at once, then split.
        canon = sample_surface(name, n_per_class * n_points, g).view(n_per_class, n_points, 3)
        clouds.append(_pose(canon, g, noise))
    points = normalize_unit_ball(torch.cat(clouds))
    labels = torch.arange(len(classes)).repeat_interleave(n_per_class)
    order = torch.randperm(len(labels), generator=g)
    return points[order].contiguous(), labels[order].contiguous()
