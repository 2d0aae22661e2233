"""Run the projection experiment over seeds and summarise the spread."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from ..._machine import machine
from ..running import output_files, prepare_out_dir, resolve_device, torch_threads
from ..stats import paired_difference, summarize
from .config import Config
from .data import require_sklearn
from .protocol import run_seed

__all__ = ["run", "aggregate", "METRICS", "TIMES"]

#: Reported metrics (fractions; higher is better except ``ece``).
METRICS: tuple[str, ...] = ("top1", "top5", "map", "map_softmax", "ece")
#: Reported times (milliseconds per image).
TIMES: tuple[str, ...] = ("forward_ms", "backward_ms", "head_forward_ms", "head_backward_ms")


def run(config: Config | None = None) -> dict[str, Any]:
    """Run the experiment and return its results (also written to ``config.out``).

    Returns:
        A JSON-ready dict with ``config``, ``seeds``, ``machine``, ``n_train``,
        ``n_test``, ``radii`` (per seed), ``rows`` (one per variant; see
        :func:`aggregate`), ``comparisons``, ``per_seed``, ``wall_seconds`` and, when
        written, ``files``.

    Raises:
        OptionError: for an invalid config (see :meth:`Config.validate`).
        ImportError: if scikit-learn (the images) is not installed.
    """
    cfg = Config() if config is None else config
    cfg.validate()
    require_sklearn()
    # Results are written last: a bad out must fail first.
    prepare_out_dir(cfg.out, "out", output_files("projection"))
    device = resolve_device(cfg.device)
    with torch_threads(cfg.threads):
        start = time.perf_counter()
        per_seed = [run_seed(cfg, seed, device) for seed in cfg.seed_list]
        result: dict[str, Any] = {
            "experiment": "projection",
            "dataset": "scikit-learn digits (8x8, 10 classes)",
            "config": dataclasses.asdict(cfg),
            "seeds": cfg.seed_list,
            "n_train": per_seed[0]["n_train"],
            "n_test": per_seed[0]["n_test"],
            "machine": machine(device),
            "radii": [{"seed": s["seed"], **s["radii"]} for s in per_seed],
            **aggregate(per_seed),
            "per_seed": per_seed,
        }
        result["wall_seconds"] = time.perf_counter() - start
    if cfg.out is not None:
        from .report import write

        result["files"] = write(result, cfg.out)
    return result


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries over seeds of :func:`~.protocol.run_seed` records.

    Returns:
        ``rows``: per variant, every metric of :data:`METRICS` and time of :data:`TIMES`
        as the mean with ``<name>_std``, ``<name>_ci95`` and ``<name>_per_seed``, plus
        ``radius`` (mean, ``None`` without projection), ``train_seconds`` (mean) and
        ``warnings`` (summed counts);
        ``comparisons``: for every variant other than a reference (``baseline`` and
        ``bn`` when present) and every metric, the paired difference variant −
        reference (:func:`~convexddn.experiments.stats.paired_difference`).
    """
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for s in per_seed:
        for r in s["variants"]:
            by_variant.setdefault(r["variant"], []).append(r)
    rows = []
    for variant, recs in by_variant.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len(recs)}
        for name in METRICS + TIMES:
            values = [r[name] for r in recs if name in r]
            if not values:
                continue
            summary = summarize(values)
            row[name] = summary["mean"]
            row[f"{name}_std"] = summary["std"]
            row[f"{name}_ci95"] = summary["ci95"]
            row[f"{name}_per_seed"] = values
        radii = [r["radius"] for r in recs]
        row["radius"] = None if radii[0] is None else sum(radii) / len(radii)
        row["train_seconds"] = sum(r["train_seconds"] for r in recs) / len(recs)
        warnings: dict[str, int] = {}
        for r in recs:
            for k, n in r["warnings"].items():
                warnings[k] = warnings.get(k, 0) + n
        row["warnings"] = warnings
        rows.append(row)

    comparisons = []
    for reference in ("baseline", "bn"):
        if reference not in by_variant:
            continue
        ref = next(r for r in rows if r["variant"] == reference)
        for row in rows:
            if row["variant"] in ("baseline", reference):
                continue
            for metric in METRICS:
                diff = paired_difference(row[f"{metric}_per_seed"], ref[f"{metric}_per_seed"])
                comparisons.append({"variant": row["variant"], "reference": reference,
                                    "metric": metric, **diff})
    return {"rows": rows, "comparisons": comparisons}
