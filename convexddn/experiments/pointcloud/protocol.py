"""One seed of the point-cloud experiment: corrupt, train, evaluate, time.

A seed fixes the generated data, the test outliers of each rate (the same whatever
other rates the run has), the initialisation (shared by every pooling: they have the
same parameters) and the batch order, so the poolings of one seed are compared on
identical inputs and can be paired across seeds.

Evaluation uses ``model.eval()`` (BatchNorm running statistics) on a shuffled test set:
with per-batch statistics the network partly adapts to each test batch's outliers and
the collapse of max pooling is hidden.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ...errors import OptionError
from ..metrics import mean_average_precision
from ..pointnet import PointNet
from ..running import CountLibraryWarnings, Stopwatch, show_progress
from ..shapes import CLASSES, make_dataset
from .config import DISPLAY_NAMES, Config, check_outlier_count

__all__ = ["add_outliers", "run_seed"]

# The test set, the test outliers and the batch order get seeds of their own derived
# from the run's seed, so that changing one part of the protocol does not reshuffle
# the others. Distinct (seed, stream, rate) triples get distinct seeds for runs of
# fewer than 10,000 seeds.
_TEST_SEED_OFFSET = 10_007
_TEST_OUTLIER_SEED_OFFSET = 20_011
_TRAIN_ORDER_SEED_OFFSET = 30_011
_TIMING_SEED_OFFSET = 40_009
# Rate key k's test outliers: seed + 20,011 + k·stride (a stride of 1 made seed s's second
# rate reuse seed s + 1's first rate's outliers, correlating the seeds).
_RATE_SEED_STRIDE = 1_000_003
# Keys of rates outside the preset's list: this base plus the rate in units of 1e-9 (above
# every preset list's indices; 1e-9 is far below 1 / n_points for any cloud that fits).
_OFF_LIST_KEY_BASE = 16
_RATE_RESOLUTION = 1e-9


def rate_key(rate: float, preset_rates: Sequence[float]) -> int:
    """The key of a rate's test outliers: its index in ``preset_rates`` (the preset's
    fixed default list, :attr:`.Config.preset_rates`), else ``16 + round(rate / 1e-9)``.

    A function of the rate's value and the preset alone: the index in the run's own
    ``rates`` made ``--rates 90`` and ``--rates 0,90`` corrupt the test clouds at 90 %
    differently. Keying on the preset's list keeps each default run's outliers (and so
    the committed results) as they were.
    """
    units = round(rate / _RATE_RESOLUTION)
    for i, r in enumerate(preset_rates):
        if round(r / _RATE_RESOLUTION) == units:
            return i
    return _OFF_LIST_KEY_BASE + units


def outlier_seed(seed: int, key: int) -> int:
    """Seed of the test outliers of the rate with key ``key`` (:func:`rate_key`) in the run's ``seed``."""
    return seed + _TEST_OUTLIER_SEED_OFFSET + key * _RATE_SEED_STRIDE


def add_outliers(points: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Replace ``round(rate * N)`` points of each cloud by points uniform in the unit ball.

    Which points are replaced is drawn independently per cloud. The input is not
    modified. Randomness comes from ``generator`` (a CPU generator, so results do not
    depend on the device of ``points``).

    Shape: ``(B, N, 3) -> (B, N, 3)``.

    Raises:
        OptionError: if ``rate`` is outside ``[0, 1]``, or positive but too small to
            replace one point (``round(rate * N) == 0``).
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise OptionError(f"rate must lie in [0, 1], got {rate!r}")
    b, n, _ = points.shape
    k = check_outlier_count(rate, n)
    if k == 0:
        return points.clone()
    # The first k entries of a random permutation of each row: k distinct indices per cloud.
    idx = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k]
    # Uniform in the ball: uniform direction, radius with density ∝ r² (cube root).
    direction = torch.randn(b, k, 3, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radius = torch.rand(b, k, 1, generator=generator).pow(1.0 / 3.0)
    outliers = (direction * radius).to(device=points.device, dtype=points.dtype)
    out = points.clone()
    out.scatter_(1, idx.to(points.device)[..., None].expand(b, k, 3), outliers)
    return out


def _batches(batch_size: int, order: torch.Tensor) -> list[torch.Tensor]:
    chunks = list(order.split(batch_size))
    # A trailing batch of one would break BatchNorm in training; fold it into the previous one.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat((chunks[-2], chunks.pop()))
    return chunks


def _train(pooling: str, points: torch.Tensor, labels: torch.Tensor, cfg: Config, seed: int,
           device: torch.device, train_rate: float) -> nn.Module:
    """Train one PointNet. points (M, N, 3) on CPU, labels (M,) -> trained model on ``device``."""
    # Same initialisation for every pooling of a seed; the caller's global RNG state
    # is left as it was.
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = PointNet(len(CLASSES), pooling=pooling, alpha=cfg.alpha).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        order_gen = torch.Generator().manual_seed(seed + _TRAIN_ORDER_SEED_OFFSET)
        steps_per_epoch = len(_batches(cfg.batch_size, torch.arange(len(labels))))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        tag = f" @{round(100 * train_rate)}%" if cfg.train_outliers else ""
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(labels), generator=order_gen)
            bar = tqdm(_batches(cfg.batch_size, order), leave=False, file=sys.stderr,
                       desc=f"seed {seed} {DISPLAY_NAMES[pooling]}{tag} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not show_progress(cfg.progress))
            for idx in bar:
                x = points[idx]
                if train_rate > 0:
                    # Fresh outliers for every batch, from the seeded order generator.
                    x = add_outliers(x, train_rate, order_gen)
                loss = loss_fn(model(x.to(device).transpose(1, 2)), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.close()
        if cfg.recalibrate_bn:
            _recalibrate_batchnorm(model, points, labels, cfg, device, train_rate, order_gen)
    return model


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, points: torch.Tensor, labels: torch.Tensor,
                           cfg: Config, device: torch.device, train_rate: float,
                           generator: torch.Generator) -> None:
    """Recompute BatchNorm's running statistics for the final weights.

    The running averages lag behind the weights (momentum 0.1); after a short training
    run they describe an earlier network, and in eval mode the model can then predict
    one class for everything. One pass over the training batches (with training-rate
    outliers) with a cumulative average gives the statistics of the final network.
    Nothing from the test set is used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    for idx in _batches(cfg.batch_size, order):
        x = points[idx]
        if train_rate > 0:
            x = add_outliers(x, train_rate, generator)
        model(x.to(device).transpose(1, 2))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.no_grad()
def _evaluate(model: nn.Module, points: torch.Tensor, labels: torch.Tensor, cfg: Config,
              device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy and mAP (softmax scores) of ``model`` in eval mode. points (M, N, 3), labels (M,)."""
    model.eval()
    logits = [model(points[idx].to(device).transpose(1, 2)).float().cpu()
              for idx in torch.arange(len(labels)).split(cfg.eval_batch_size)]
    scores = torch.cat(logits).softmax(dim=1)
    accuracy = float((scores.argmax(dim=1) == labels).double().mean())
    return accuracy, mean_average_precision(scores, labels)


def _time_steps(model: nn.Module, points: torch.Tensor, labels: torch.Tensor, cfg: Config,
                seed: int, device: torch.device) -> list[dict[str, Any]]:
    """Runtime per training cloud (Table 5): data, forward, backward, at each timing rate.

    One untimed warm-up step, then ``cfg.timing_batches`` timed steps of the trained
    model in training mode: *data* = corrupting the batch and moving it to the device,
    *forward* = network and loss, *backward* = ``loss.backward()``. The optimiser step
    is left out (the same for every pooling). The (lower) median step is kept, robust
    to interference from other processes, and divided by the batch size.
    """
    gen = torch.Generator().manual_seed(seed + _TIMING_SEED_OFFSET)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    rows = []
    for rate in cfg.timing_rates:
        laps: dict[str, list[float]] = {"data": [], "forward": [], "backward": []}
        for step in range(1 + cfg.timing_batches):
            idx = torch.randperm(len(labels), generator=gen)[: cfg.batch_size]
            watch = Stopwatch(device)
            watch.start()
            x = add_outliers(points[idx], rate, gen).to(device).transpose(1, 2)
            y = labels[idx].to(device)
            watch.lap("data")
            loss = loss_fn(model(x), y)
            watch.lap("forward")
            loss.backward()
            watch.lap("backward")
            model.zero_grad(set_to_none=True)
            if step > 0:  # the first step warms up allocators and caches
                for name in laps:
                    laps[name].append(watch.seconds[name])
        row: dict[str, Any] = {"rate": rate}
        for name, times in laps.items():
            row[f"{name}_ms"] = 1e3 * float(torch.tensor(times).median()) / len(idx)
        rows.append(row)
    return rows


def _test_sets(cfg: Config, seed: int, test_x: torch.Tensor) -> dict[float, torch.Tensor]:
    """One corrupted copy of the test clouds ``(M, N, 3)`` per rate of ``cfg.rates``, shared
    by every pooling; each rate's outliers depend on the seed, the preset and the rate only."""
    return {rate: add_outliers(test_x, rate, torch.Generator().manual_seed(
                outlier_seed(seed, rate_key(rate, cfg.preset_rates))))
            for rate in cfg.rates}


def run_seed(cfg: Config, seed: int, device: torch.device) -> dict[str, Any]:
    """Train and evaluate every pooling (and training rate) for one seed.

    Returns:
        ``{"seed", "evaluations", "models", "timing"}``: one evaluation per pooling,
        training rate and test rate (``accuracy``, ``map`` as fractions), one model
        record per trained model (``train_seconds``, ``eval_seconds``, ``warnings``) and
        one timing row per pooling and timing rate (milliseconds per cloud).
    """
    train_x, train_y = make_dataset(cfg.train_per_class, cfg.n_points, seed=seed)
    test_x, test_y = make_dataset(cfg.test_per_class, cfg.n_points, seed=seed + _TEST_SEED_OFFSET)
    test_sets = _test_sets(cfg, seed, test_x)
    evaluations: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    train_rates = list(cfg.rates) if cfg.train_outliers else [0.0]
    for pooling in cfg.poolings:
        for i, train_rate in enumerate(train_rates):
            with CountLibraryWarnings() as counted:
                t0 = time.perf_counter()
                model = _train(pooling, train_x, train_y, cfg, seed, device, train_rate)
                train_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                for rate in ([train_rate] if cfg.train_outliers else cfg.rates):
                    acc, mean_ap = _evaluate(model, test_sets[rate], test_y, cfg, device)
                    evaluations.append({"pooling": pooling, "rate": rate, "train_rate": train_rate,
                                        "accuracy": acc, "map": mean_ap})
                eval_seconds = time.perf_counter() - t0
                # Time each pooling once per seed (on its first trained model), after
                # its evaluation so the timing steps cannot change the reported figures.
                if i == 0 and cfg.timing_batches > 0 and cfg.timing_rates:
                    for row in _time_steps(model, train_x, train_y, cfg, seed, device):
                        timing.append({"pooling": pooling, **row})
            models.append({"pooling": pooling, "train_rate": train_rate, "train_seconds": train_seconds,
                           "eval_seconds": eval_seconds, "warnings": counted.counts})
    return {"seed": seed, "n_train": len(train_y), "n_test": len(test_y),
            "evaluations": evaluations, "models": models, "timing": timing}
