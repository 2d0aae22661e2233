"""The point-cloud robustness experiment (Gould et al., "Deep Declarative Networks", §7).

A small PointNet is trained on generated shapes (:mod:`.shapes`) once per pooling
(:mod:`.pointnet`) and tested on clouds in which a fraction of the points has been
replaced by outliers drawn uniformly from the unit ball. Two protocols:

- default (the paper's Table 4): train without outliers, test at every rate;
- ``train_outliers=True`` (Table 3): for each rate, train and test at that rate
  (one model per pooling and rate, so about ``len(rates)`` times the cost).

Reported per pooling and rate: top-1 accuracy and mean average precision (one-vs-rest
average precision per class, averaged over classes). Outputs: a markdown table,
``<out>/pointcloud.json`` and ``<out>/pointcloud.png``.

Evaluation uses ``model.eval()`` (BatchNorm running statistics) on a shuffled test set:
with per-batch statistics the network partly adapts to each test batch's outliers and
the collapse of max pooling is hidden.

Entry points: :func:`run` (``Config -> dict``) and, for the ``convexddn`` command,
:func:`add_arguments` and :func:`main`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .._machine import machine
from .._checks import check_choice
from ..errors import ConvexDDNWarning, OptionError, ShapeError
from .pointnet import POOLINGS, PointNet
from .shapes import CLASSES, make_dataset

__all__ = [
    "Config",
    "add_outliers",
    "average_precision",
    "mean_average_precision",
    "run",
    "format_table",
    "add_arguments",
    "main",
]

#: Column headings, in the paper's wording.
DISPLAY_NAMES: dict[str, str] = {
    "max": "max",
    "mean": "mean",
    "quadratic": "quad.",
    "pseudo_huber": "pseudo-Huber",
    "huber": "Huber",
    "welsch": "Welsch",
    "trunc_quad": "trunc. quad.",
}

DEFAULT_POOLINGS: tuple[str, ...] = ("max", "quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad")
DEFAULT_RATES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))

# The test set and the test outliers get seeds of their own, derived from Config.seed,
# so that changing one part of the protocol does not reshuffle the others.
_TEST_SEED_OFFSET = 10_007
_TEST_OUTLIER_SEED_OFFSET = 20_011
_TRAIN_ORDER_SEED_OFFSET = 30_011


@dataclass
class Config:
    """Settings of one run. ``Config()`` is the default preset; ``Config.quick()`` the smoke test.

    Attributes:
        poolings: poolings to compare (see :data:`convexddn.experiments.pointnet.POOLINGS`).
        rates: outlier fractions in ``[0, 1)``; each is a test rate (and, with
            ``train_outliers``, also the training rate).
        train_outliers: use the same outlier rate in training and testing.
        n_points: points per cloud.
        train_per_class / test_per_class: clouds per class in each split.
        epochs, batch_size, lr: Adam with cosine decay of the learning rate per step.
        alpha: robust-pooling scale.
        seed: seeds data, outliers, initialisation and batch order.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: directory for ``pointcloud.json`` and ``pointcloud.png``; ``None`` writes nothing.
        progress: show tqdm bars (one per epoch) on stderr.
        threads: if set, ``torch.set_num_threads`` for the run (restored afterwards).
        recalibrate_bn: after training, recompute BatchNorm's running statistics with
            one pass over the training set (see ``_recalibrate_batchnorm``).
        preset: name of the preset the config came from (recorded in the JSON).
    """

    poolings: tuple[str, ...] = DEFAULT_POOLINGS
    rates: tuple[float, ...] = DEFAULT_RATES
    train_outliers: bool = False
    n_points: int = 512
    train_per_class: int = 100
    test_per_class: int = 30
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    alpha: float = 1.0
    seed: int = 0
    device: str = "cpu"
    out: str | None = "results"
    progress: bool = True
    eval_batch_size: int = 128
    threads: int | None = None
    recalibrate_bn: bool = True
    preset: str = "default"

    @classmethod
    def default(cls, **overrides: Any) -> "Config":
        """The full experiment: 512 points, 100/30 clouds per class, 4 epochs."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        """A smoke test that finishes in well under a minute on 2 CPU cores.

        64 points, 10/5 clouds per class, 2 epochs: enough to exercise every code path
        and show the trend, far too little for figures worth quoting.
        """
        settings: dict[str, Any] = dict(
            n_points=64, train_per_class=10, test_per_class=5, epochs=2, batch_size=20, lr=3e-3,
            preset="quick",
        )
        settings.update(overrides)
        return cls(**settings)

    def validate(self) -> None:
        """Raise ``OptionError`` naming the first invalid field."""
        if not self.poolings:
            raise OptionError("poolings must name at least one pooling, got ()")
        for p in self.poolings:
            check_choice("poolings", p, POOLINGS)
        if len(set(self.poolings)) != len(self.poolings):
            raise OptionError(f"poolings must not repeat, got {self.poolings!r}")
        if not self.rates:
            raise OptionError("rates must name at least one outlier rate, got ()")
        for r in self.rates:
            if not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise OptionError(f"rates must lie in [0, 1), got {r!r}")
        for name in ("n_points", "train_per_class", "test_per_class", "epochs", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise OptionError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            # BatchNorm cannot train on a batch of one.
            raise OptionError(f"batch_size must be an int >= 2, got {self.batch_size!r}")
        for name in ("lr", "alpha"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise OptionError(f"{name} must be finite and > 0, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise OptionError(f"threads must be a positive int or None, got {self.threads!r}")
        _resolve_device(self.device)


def _resolve_device(device: str) -> torch.device:
    if not isinstance(device, str) or not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise OptionError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device={device!r} was asked for but torch sees no CUDA device")
    return dev


# --------------------------------------------------------------------------- protocol


def add_outliers(points: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Replace ``round(rate * N)`` points of each cloud by points uniform in the unit ball.

    Which points are replaced is drawn independently per cloud. The input is not
    modified. Randomness comes from ``generator`` (a CPU generator, so results do not
    depend on the device of ``points``).

    Shape: ``(B, N, 3) -> (B, N, 3)``.

    Raises:
        OptionError: if ``rate`` is outside ``[0, 1]``.
    """
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise OptionError(f"rate must lie in [0, 1], got {rate!r}")
    b, n, _ = points.shape
    k = int(round(rate * n))
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


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-vs-rest average precision per class.

    For class ``c``, samples are ranked by ``scores[:, c]`` (descending) and

    .. math::

        AP_c = \\frac{1}{P_c} \\sum_{i:\\, y_i = c} \\operatorname{precision}(s_{ic}),

    the precision of the set ``{j : s_jc ≥ s_ic}``; tied scores thus share one
    threshold (the same definition as scikit-learn's ``average_precision_score``).

    Shape: scores ``(M, C)``, labels ``(M,)`` int in ``[0, C)`` -> ``(C,)`` float64;
    ``NaN`` for a class with no positive sample.

    Raises:
        ShapeError: if ``scores`` is not 2-D or ``labels`` does not match its rows.
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ShapeError(
            f"scores must be (M, C) and labels (M,), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    m, c = scores.shape
    s = scores.detach().to(torch.float64).T  # (C, M)
    positive = (labels.to(scores.device)[None, :] == torch.arange(c, device=scores.device)[:, None])
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    s_sorted = s.gather(1, order)
    y_sorted = positive.gather(1, order).to(torch.float64)
    true_pos = y_sorted.cumsum(dim=1)
    # Number of samples scoring >= each sorted score: the end of its tie group.
    ascending = s_sorted.flip(1).contiguous()
    n_at_least = m - torch.searchsorted(ascending, s_sorted.contiguous(), right=False)
    precision = true_pos.gather(1, n_at_least - 1) / n_at_least
    n_pos = y_sorted.sum(dim=1)
    return (precision * y_sorted).sum(dim=1) / n_pos  # 0/0 = NaN for an absent class


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of :func:`average_precision`.

    Shape: scores ``(M, C)``, labels ``(M,)`` -> a float in ``[0, 1]``.
    """
    ap = average_precision(scores, labels)
    present = ~torch.isnan(ap)
    return float(ap[present].mean())


# ------------------------------------------------------------------------ train / test


def _batches(batch_size: int, order: torch.Tensor) -> list[torch.Tensor]:
    chunks = list(order.split(batch_size))
    # A trailing batch of one would break BatchNorm in training; fold it into the previous one.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat((chunks[-2], chunks.pop()))
    return chunks


def _train(
    pooling: str,
    points: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    device: torch.device,
    train_rate: float,
    num_classes: int,
) -> nn.Module:
    """Train one PointNet. points (M, N, 3) on CPU, labels (M,) -> trained model on ``device``."""
    # Same initialisation for every pooling (they share the parameter layout); the
    # caller's global RNG state is left as it was.
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        model = PointNet(num_classes, pooling=pooling, alpha=cfg.alpha).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        order_gen = torch.Generator().manual_seed(cfg.seed + _TRAIN_ORDER_SEED_OFFSET)
        steps_per_epoch = len(_batches(cfg.batch_size, torch.arange(len(labels))))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(labels), generator=order_gen)
            batches = _batches(cfg.batch_size, order)
            tag = f" @{round(100 * train_rate)}%" if cfg.train_outliers else ""
            bar = tqdm(
                batches,
                desc=f"{DISPLAY_NAMES[pooling]}{tag} epoch {epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress,
                leave=False,
                file=sys.stderr,
            )
            for idx in bar:
                x = points[idx]
                if train_rate > 0:
                    # Fresh outliers for every batch, from the seeded order generator.
                    x = add_outliers(x, train_rate, order_gen)
                x = x.to(device).transpose(1, 2)  # (B, N, 3) -> (B, 3, N)
                y = labels[idx].to(device)
                loss = loss_fn(model(x), y)
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
def _recalibrate_batchnorm(
    model: nn.Module,
    points: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    device: torch.device,
    train_rate: float,
    generator: torch.Generator,
) -> None:
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
    """Top-1 accuracy and mAP of ``model`` in eval mode. points (M, N, 3), labels (M,)."""
    model.eval()
    logits = []
    for idx in torch.arange(len(labels)).split(cfg.eval_batch_size):
        logits.append(model(points[idx].to(device).transpose(1, 2)).float().cpu())
    scores = torch.cat(logits).softmax(dim=1)
    accuracy = float((scores.argmax(dim=1) == labels).double().mean())
    return accuracy, mean_average_precision(scores, labels)


class _CountLibraryWarnings(warnings.catch_warnings):
    """Count convexddn warnings (by class name) instead of printing each one.

    A solver warning from robust pooling can fire on many training steps; the count
    goes into the JSON and one summary line, rather than interleaving with the
    progress bars. Other warnings are shown as usual when the block ends.
    """

    def __init__(self) -> None:
        super().__init__(record=True)
        self.counts: dict[str, int] = {}

    def __enter__(self) -> "_CountLibraryWarnings":
        self._log = super().__enter__()
        warnings.simplefilter("always", ConvexDDNWarning)
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for w in self._log:
            if issubclass(w.category, ConvexDDNWarning):
                name = w.category.__name__
                self.counts[name] = self.counts.get(name, 0) + 1
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run(config: Config | None = None) -> dict[str, Any]:
    """Run the experiment and return its results (also written to ``config.out``).

    Returns:
        A JSON-ready dict with ``config``, ``protocol``, ``classes``, ``machine``,
        ``rows`` (one per pooling and rate: ``pooling``, ``rate``, ``train_rate``,
        ``accuracy``, ``map``; fractions in ``[0, 1]``), ``models`` (one per trained
        model: ``pooling``, ``train_rate``, ``train_seconds``, ``eval_seconds`` (all its
        test rates) and ``warnings``, the count
        of convexddn warnings by class, e.g. solver iterations that hit their limit),
        ``wall_seconds`` and, when written, the ``files``.

    Raises:
        OptionError: for an invalid config (see :meth:`Config.validate`).
    """
    cfg = Config() if config is None else config
    cfg.validate()
    device = _resolve_device(cfg.device)
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: Config, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    classes = list(CLASSES)
    train_x, train_y = make_dataset(cfg.train_per_class, cfg.n_points, seed=cfg.seed, classes=classes)
    test_x, test_y = make_dataset(
        cfg.test_per_class, cfg.n_points, seed=cfg.seed + _TEST_SEED_OFFSET, classes=classes
    )
    # One corrupted copy of the test set per rate, shared by every pooling, so the
    # variants are compared on identical inputs.
    test_sets = {
        rate: add_outliers(
            test_x, rate, torch.Generator().manual_seed(cfg.seed + _TEST_OUTLIER_SEED_OFFSET + i)
        )
        for i, rate in enumerate(cfg.rates)
    }

    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    train_rates = list(cfg.rates) if cfg.train_outliers else [0.0]
    for pooling in cfg.poolings:
        for train_rate in train_rates:
            with _CountLibraryWarnings() as counted:
                t0 = time.perf_counter()
                model = _train(pooling, train_x, train_y, cfg, device, train_rate, len(classes))
                train_time = time.perf_counter() - t0
                test_rates = [train_rate] if cfg.train_outliers else list(cfg.rates)
                t0 = time.perf_counter()
                for rate in test_rates:
                    acc, mean_ap = _evaluate(model, test_sets[rate], test_y, cfg, device)
                    rows.append(
                        {"pooling": pooling, "rate": rate, "train_rate": train_rate,
                         "accuracy": acc, "map": mean_ap}
                    )
                eval_time = time.perf_counter() - t0
            models.append(
                {"pooling": pooling, "train_rate": train_rate, "train_seconds": train_time,
                 "eval_seconds": eval_time, "warnings": counted.counts}
            )

    result: dict[str, Any] = {
        "experiment": "pointcloud",
        "protocol": "train_and_test_outliers" if cfg.train_outliers else "test_outliers_only",
        "config": dataclasses.asdict(cfg),
        "classes": classes,
        "n_train": len(train_y),
        "n_test": len(test_y),
        "machine": machine(device),
        "rows": rows,
        "models": models,
    }
    result["wall_seconds"] = time.perf_counter() - start
    if cfg.out is not None:
        result["files"] = _write(result, cfg.out)
    return result


# -------------------------------------------------------------------------- reporting


def _grid(result: dict[str, Any], key: str) -> tuple[list[str], list[float], dict]:
    poolings = list(dict.fromkeys(r["pooling"] for r in result["rows"]))
    rates = sorted({r["rate"] for r in result["rows"]})
    cell = {(r["pooling"], r["rate"]): r[key] for r in result["rows"]}
    return poolings, rates, cell


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables of top-1 accuracy and mAP (in %), rows = outlier rate, columns = pooling."""
    caption = (
        "trained without outliers, tested with outliers"
        if result["protocol"] == "test_outliers_only"
        else "same outlier rate in training and testing"
    )
    blocks = []
    for key, title in (("accuracy", "Top-1 accuracy (%)"), ("map", "Mean average precision (%)")):
        poolings, rates, cell = _grid(result, key)
        lines = [
            f"{title}, {caption}; {result['n_test']} test clouds, {len(result['classes'])} classes",
            "",
            "| outliers | " + " | ".join(DISPLAY_NAMES[p] for p in poolings) + " |",
            "|---:|" + "---:|" * len(poolings),
        ]
        for rate in rates:
            values = " | ".join(
                f"{100 * cell[(p, rate)]:.1f}" if (p, rate) in cell else "–" for p in poolings
            )
            lines.append(f"| {100 * rate:.0f} % | {values} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "accuracy", "top-1 accuracy (%)"), (axes[1], "map", "mAP (%)")):
        poolings, rates, cell = _grid(result, key)
        for p in poolings:
            xs = [100 * r for r in rates if (p, r) in cell]
            ys = [100 * cell[(p, r)] for r in rates if (p, r) in cell]
            ax.plot(xs, ys, marker="o", label=DISPLAY_NAMES[p])
        ax.axhline(100 / len(result["classes"]), color="grey", linestyle=":", linewidth=1,
                   label="chance")
        ax.set_xlabel("outliers (%)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    title = ("trained without outliers" if result["protocol"] == "test_outliers_only"
             else "same outlier rate in training and testing")
    fig.suptitle(f"PointNet on generated shapes: robustness to outliers ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(result: dict[str, Any], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    files = {"json": os.path.join(out, "pointcloud.json"), "png": os.path.join(out, "pointcloud.png")}
    _plot(result, files["png"])
    with open(files["json"], "w") as f:
        json.dump({**result, "files": files}, f, indent=2)
    return files


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``convexddn experiment pointcloud`` to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke-test configuration (well under a minute on 2 CPU cores)")
    parser.add_argument("--train-outliers", action="store_true",
                        help="use the same outlier rate in training and testing (paper's Table 3); "
                             "trains one model per pooling and rate")
    parser.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda' or 'cuda:N'")
    parser.add_argument("--out", default="results",
                        help="directory for pointcloud.json and pointcloud.png (default: results)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 4, or 1 with --quick)")
    parser.add_argument("--rates", default=None,
                        help="comma-separated outlier rates in percent (default: 0,10,...,90); "
                             "with --train-outliers one model is trained per pooling and rate")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the run (default: torch's own choice)")
    parser.add_argument("--poolings", default=None,
                        help="comma-separated poolings (default: " + ",".join(DEFAULT_POOLINGS)
                             + f"; choices: {','.join(POOLINGS)})")


def config_from_args(args: argparse.Namespace) -> Config:
    """Build a :class:`Config` from parsed :func:`add_arguments` options."""
    overrides: dict[str, Any] = {
        "train_outliers": bool(getattr(args, "train_outliers", False)),
        "device": getattr(args, "device", "cpu") or "cpu",
        "out": getattr(args, "out", "results"),
    }
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    if getattr(args, "epochs", None) is not None:
        overrides["epochs"] = args.epochs
    if getattr(args, "rates", None):
        try:
            overrides["rates"] = tuple(float(r) / 100 for r in args.rates.split(",") if r.strip())
        except ValueError:
            raise OptionError(
                f"--rates must be comma-separated percentages such as 0,10,50, got {args.rates!r}"
            ) from None
    if getattr(args, "threads", None) is not None:
        overrides["threads"] = args.threads
    if getattr(args, "poolings", None):
        overrides["poolings"] = tuple(p.strip() for p in args.poolings.split(",") if p.strip())
    preset = Config.quick if getattr(args, "quick", False) else Config.default
    return preset(**overrides)


def main(args: argparse.Namespace) -> int:
    """Run from parsed arguments, print the tables to stdout; returns the exit status 0."""
    result = run(config_from_args(args))
    print(format_table(result))
    print(f"\nwall time {result['wall_seconds']:.1f} s on {result['machine']['device']} "
          f"({result['machine']['torch_threads']} threads, torch {result['machine']['torch']})")
    for m in result["models"]:
        if m["warnings"]:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(m["warnings"].items()))
            rate = f" (train rate {100 * m['train_rate']:.0f} %)" if result["config"]["train_outliers"] else ""
            print(f"note: {DISPLAY_NAMES[m['pooling']]}{rate}: {counts}", file=sys.stderr)
    for path in result.get("files", {}).values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m convexddn.experiments.pointcloud
    _parser = argparse.ArgumentParser(prog="convexddn experiment pointcloud")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
