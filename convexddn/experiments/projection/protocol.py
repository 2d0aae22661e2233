"""One seed of the projection experiment: radius, training, evaluation, timing.

Per seed: draw the split; train the ``bn`` model (normalisation, no projection) and
set every projection radius from the median feature norm of that model on the
training images; train every requested variant from the same initialisation and the
same batch order; evaluate top-1, top-5, mAP and calibration on the test split; time
the forward and backward pass per image.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..metrics import expected_calibration_error, mean_average_precision, top_k_accuracy
from ..running import CountLibraryWarnings, Stopwatch, show_progress
from .config import DISPLAY_NAMES, Config, variant_projection
from .data import NUM_CLASSES, split_digits
from .model import DigitsCNN

__all__ = ["median_feature_norms", "evaluate", "run_seed"]

_ORDER_SEED_OFFSET = 30_011
_TIMING_SEED_OFFSET = 40_009
_NORMS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    chunks = list(torch.randperm(n, generator=generator).split(batch_size))
    # A trailing batch of one would break BatchNorm in training; fold it into the previous one.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat((chunks[-2], chunks.pop()))
    return chunks


def _train(variant: str, radius: float | None, x: torch.Tensor, y: torch.Tensor, cfg: Config,
           seed: int, device: torch.device) -> nn.Module:
    """Train one :class:`DigitsCNN` (SGD, one-cycle schedule); return it in eval mode."""
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # same initialisation for every variant of a seed
        model = DigitsCNN(variant, radius=radius, width=cfg.width, num_classes=NUM_CLASSES).to(device)
        order = torch.Generator().manual_seed(seed + _ORDER_SEED_OFFSET)
        steps = cfg.epochs * len(_batches(len(y), cfg.batch_size, torch.Generator()))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
        xd, yd = x.to(device), y.to(device)
        model.train()
        bar = tqdm(range(cfg.epochs), desc=f"seed {seed} {DISPLAY_NAMES[variant]}", leave=False,
                   file=sys.stderr, disable=not show_progress(cfg.progress))
        for _ in bar:
            for idx in _batches(len(y), cfg.batch_size, order):
                idx = idx.to(device)
                loss = nn.functional.cross_entropy(model(xd[idx]), yd[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        _recalibrate_batchnorm(model, xd, cfg.batch_size, order)
    model.eval()
    return model


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int,
                           generator: torch.Generator) -> None:
    """Recompute BatchNorm running statistics for the final weights (one training pass).

    After a short run the momentum averages describe earlier weights; a cumulative
    average over one pass describes the network that is evaluated. No test image is used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for idx in _batches(len(x), batch_size, generator):
        model(x[idx.to(x.device)])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.no_grad()
def median_feature_norms(model: DigitsCNN, x: torch.Tensor) -> dict[str, float]:
    """Median over images of ``||z||_p`` for p = 1, 2, ∞, ``z`` the features entering the head.

    Evaluated in eval mode (running statistics), on the images given (the training
    split): ``{"l1": ..., "l2": ..., "linf": ...}``.
    """
    model.eval()
    z = model.embed(x)
    return {name: float(torch.linalg.vector_norm(z, ord=p, dim=1).median()) for name, p in _NORMS.items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ece_bins: int) -> dict[str, float]:
    """Top-1, top-5, mAP of the logits, mAP of the softmax and ECE on ``(x, y)`` (eval mode).

    mAP ranks the images per class by their score. Like the paper's code it ranks by
    the raw outputs (logits); the softmax ranking is reported as well because the two
    can disagree (the softmax rescales every image's scores by its own normaliser).
    """
    model.eval()
    logits = model(x).double()
    probs = logits.softmax(dim=1)
    return {
        "top1": top_k_accuracy(logits, y, 1),
        "top5": top_k_accuracy(logits, y, min(5, logits.shape[1])),
        "map": mean_average_precision(logits, y),
        "map_softmax": mean_average_precision(probs, y),
        "ece": expected_calibration_error(probs, y, ece_bins),
    }


def _time(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor, cfg: Config, seed: int,
          device: torch.device) -> dict[str, float]:
    """Milliseconds per image: forward and backward of the whole model, and of the head alone.

    One untimed warm-up step, then ``cfg.timing_batches`` steps on batches of
    ``cfg.timing_batch_size`` training images in training mode; the (lower) median step
    is kept, robust to interference from other processes. *Head* is the normalisation
    and projection on the batch's features (detached, so its backward is the head's own).
    """
    gen = torch.Generator().manual_seed(seed + _TIMING_SEED_OFFSET)
    laps: dict[str, list[float]] = {"forward": [], "backward": [], "head_forward": [], "head_backward": []}
    model.train()
    for step in range(1 + cfg.timing_batches):
        idx = torch.randperm(len(y), generator=gen)[: cfg.timing_batch_size].to(device)
        xb, yb = x[idx], y[idx]
        watch = Stopwatch(device)
        watch.start()
        loss = nn.functional.cross_entropy(model(xb), yb)
        watch.lap("forward")
        loss.backward()
        watch.lap("backward")
        model.zero_grad(set_to_none=True)
        feats = model.features(xb).detach().requires_grad_(True)
        watch.start()
        head = feats if model.norm is None else model.norm(feats)
        head = head if model.project is None else model.project(head)
        watch.lap("head_forward")
        head.sum().backward()
        watch.lap("head_backward")
        if step > 0:
            for name in laps:
                laps[name].append(watch.seconds[name])
    return {f"{name}_ms": 1e3 * float(torch.tensor(t).median()) / len(idx) for name, t in laps.items()}


def run_seed(cfg: Config, seed: int, device: torch.device) -> dict[str, Any]:
    """Train, evaluate and time every variant for one seed.

    Returns:
        ``{"seed", "n_train", "n_test", "radii", "variants"}``: ``radii`` maps
        ``l1``/``l2``/``linf`` to the radius used (``radius_scale`` × median norm;
        empty when no projection variant runs), ``variants`` holds one record per
        variant with its metrics (fractions), ``radius``, ``train_seconds``, the
        timings (ms per image) and the count of library ``warnings``.
    """
    train_x, train_y, test_x, test_y = split_digits(cfg.train_fraction, seed)
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    radii: dict[str, float] = {}
    records = []
    need_radius = any(variant_projection(v) is not None for v in cfg.variants)
    order = (["bn"] if need_radius or "bn" in cfg.variants else []) + [v for v in cfg.variants if v != "bn"]
    for variant in order:
        projection = variant_projection(variant)
        radius = None
        if projection is not None:
            name = {1: "l1", 2: "l2", math.inf: "linf"}[projection[0]]
            radius = radii[name]
        with CountLibraryWarnings() as counted:
            t0 = time.perf_counter()
            model = _train(variant, radius, train_x, train_y, cfg, seed, device)
            train_seconds = time.perf_counter() - t0
            if variant == "bn" and need_radius:
                medians = median_feature_norms(model, train_x)
                radii = {k: cfg.radius_scale * v for k, v in medians.items()}
            if variant not in cfg.variants:
                continue  # trained only to set the radii
            metrics = evaluate(model, test_x, test_y, cfg.ece_bins)
            timing = _time(model, train_x, train_y, cfg, seed, device) if cfg.timing_batches > 0 else {}
        records.append({"variant": variant, "radius": radius, "train_seconds": train_seconds,
                        **metrics, **timing, "warnings": counted.counts})
    records.sort(key=lambda r: cfg.variants.index(r["variant"]))
    return {"seed": seed, "n_train": len(train_y), "n_test": len(test_y), "radii": radii, "variants": records}
