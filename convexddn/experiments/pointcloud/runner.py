"""Run the point-cloud experiment over seeds and summarise the spread.

:func:`run` repeats :func:`~.protocol.run_seed` for every seed and turns the per-seed
records into the rows of the report: mean, standard deviation and 95 % interval per
pooling and rate, the runtime table, and paired comparisons that say which
differences between poolings exceed the spread over seeds.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from ..._machine import machine
from ..shapes import CLASSES
from ..running import output_files, prepare_out_dir, resolve_device, torch_threads
from ..stats import paired_difference, summarize
from .config import Config
from .protocol import run_seed

__all__ = ["run", "aggregate"]

_METRICS = ("accuracy", "map")
_TIMES = ("data_ms", "forward_ms", "backward_ms")


def run(config: Config | None = None) -> dict[str, Any]:
    """Run the experiment and return its results (also written to ``config.out``).

    Returns:
        A JSON-ready dict with ``config``, ``protocol``, ``seeds``, ``classes``,
        ``machine``, ``rows`` (one per pooling and rate; see :func:`aggregate`),
        ``runtime`` (Table 5), ``comparisons``, ``per_seed`` (the raw records),
        ``models``, ``wall_seconds`` and, when written, ``files``.

    Raises:
        OptionError: for an invalid config (see :meth:`Config.validate`).
    """
    cfg = Config() if config is None else config
    cfg.validate()
    # Results are written last: a bad out must fail first.
    prepare_out_dir(cfg.out, "out", output_files("pointcloud"))
    device = resolve_device(cfg.device)
    with torch_threads(cfg.threads):
        start = time.perf_counter()
        per_seed = [run_seed(cfg, seed, device) for seed in cfg.seed_list]
        result: dict[str, Any] = {
            "experiment": "pointcloud",
            "protocol": "train_and_test_outliers" if cfg.train_outliers else "test_outliers_only",
            "config": dataclasses.asdict(cfg),
            "seeds": cfg.seed_list,
            "classes": list(CLASSES),
            "n_train": per_seed[0]["n_train"],
            "n_test": per_seed[0]["n_test"],
            "machine": machine(device),
            **aggregate(per_seed),
            "models": [{**m, "seed": s["seed"]} for s in per_seed for m in s["models"]],
            "per_seed": [{k: s[k] for k in ("seed", "evaluations", "timing")} for s in per_seed],
        }
        result["wall_seconds"] = time.perf_counter() - start
    if cfg.out is not None:
        from .report import write

        result["files"] = write(result, cfg.out)
    return result


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries over seeds of :func:`~.protocol.run_seed` records.

    Returns:
        ``rows``: per pooling, training rate and test rate, ``accuracy`` and ``map``
        (the means, fractions in ``[0, 1]``) with ``<metric>_std``, ``<metric>_ci95``
        (half-width, ``None`` with one seed) and ``<metric>_per_seed``;
        ``runtime``: per pooling and timing rate, ``data_ms``, ``forward_ms``,
        ``backward_ms`` and ``total_ms`` per cloud: the median over seeds, with
        ``_min``, ``_max``, ``_mean`` and ``_std``;
        ``comparisons``: per training and test rate, the pooling with the best mean
        accuracy and, for each other pooling, the paired difference to it
        (:func:`~convexddn.experiments.stats.paired_difference`, in accuracy points
        as fractions).
    """
    evaluations: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for s in per_seed:
        for e in s["evaluations"]:
            evaluations.setdefault((e["pooling"], e["train_rate"], e["rate"]), []).append(e)
    rows = []
    for (pooling, train_rate, rate), es in evaluations.items():
        row: dict[str, Any] = {"pooling": pooling, "rate": rate, "train_rate": train_rate, "seeds": len(es)}
        for metric in _METRICS:
            values = [e[metric] for e in es]
            summary = summarize(values)
            row[metric] = summary["mean"]
            row[f"{metric}_std"] = summary["std"]
            row[f"{metric}_ci95"] = summary["ci95"]
            row[f"{metric}_per_seed"] = values
        rows.append(row)

    timings: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for s in per_seed:
        for t in s["timing"]:
            timings.setdefault((t["pooling"], t["rate"]), []).append(t)
    runtime = []
    for (pooling, rate), ts in timings.items():
        row = {"pooling": pooling, "rate": rate, "seeds": len(ts)}
        for name in _TIMES + ("total_ms",):
            values = sorted(sum(t[k] for k in _TIMES) if name == "total_ms" else t[name] for t in ts)
            summary = summarize(values)
            # A process that shares the machine slows every step of a seed it overlaps,
            # which the median step within the seed cannot filter: the median over seeds
            # (with the range) is the robust figure, the mean ± std is kept beside it.
            row[name] = statistics.median(values)
            row[f"{name}_min"], row[f"{name}_max"] = values[0], values[-1]
            row[f"{name}_mean"] = summary["mean"]
            row[f"{name}_std"] = summary["std"]
        runtime.append(row)
    return {"rows": rows, "runtime": runtime, "comparisons": _compare(rows)}


def _compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (training rate, test rate): the best pooling by mean accuracy vs each other one."""
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["train_rate"], r["rate"]), []).append(r)
    out = []
    for (train_rate, rate), group in groups.items():
        best = max(group, key=lambda r: r["accuracy"])
        versus = {}
        for r in group:
            if r is not best:
                versus[r["pooling"]] = paired_difference(best["accuracy_per_seed"], r["accuracy_per_seed"])
        out.append({"train_rate": train_rate, "rate": rate, "metric": "accuracy",
                    "best": best["pooling"], "versus": versus})
    return out
