"""Report of the projection experiment: markdown tables, the bar chart, the JSON file."""
from __future__ import annotations

from typing import Any

from ..running import save_figure, write_result
from ..stats import format_mean_std
from .config import DISPLAY_NAMES

__all__ = ["format_table", "format_comparisons", "format_runtime_table", "plot", "write"]

_METRIC_NAMES = {"top1": "top-1", "top5": "top-5", "map": "mAP (logits)",
                 "map_softmax": "mAP (softmax)", "ece": "ECE"}


def _threads(machine: dict[str, Any]) -> str:
    n = machine["torch_threads"]
    return f"{n} torch thread{'s' if n != 1 else ''}"


def _spread(result: dict[str, Any]) -> str:
    n = len(result["seeds"])
    return f"mean ± std over {n} seeds" if n > 1 else "one seed"


def format_table(result: dict[str, Any]) -> str:
    """Markdown table, one row per variant: metrics in % and the projection radius."""
    cfg = result["config"]
    lines = [f"Digits (8×8, 10 classes), {result['n_train']} training / {result['n_test']} test images "
             f"per seed, {cfg['epochs']} epochs; {_spread(result)}; all values in % "
             f"(ECE: lower is better)", "",
             "| variant | radius | " + " | ".join(_METRIC_NAMES.values()) + " |",
             "|---|---:|" + "---:|" * len(_METRIC_NAMES)]
    for row in result["rows"]:
        radius = "–" if row["radius"] is None else f"{row['radius']:.3g}"
        values = [format_mean_std({"mean": row[m], "std": row[f"{m}_std"], "n": row["seeds"]}, digits=2)
                  for m in _METRIC_NAMES]
        lines.append(f"| {DISPLAY_NAMES[row['variant']]} | {radius} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def format_comparisons(result: dict[str, Any], reference: str = "baseline") -> str:
    """Paired differences (variant − reference, points) with 95 % intervals; * = beyond
    the spread, † = the same difference in every seed (no spread to judge by: neither
    real nor not, see :func:`..stats.paired_difference`)."""
    comps = [c for c in result["comparisons"] if c["reference"] == reference]
    if not comps:
        return ""
    if len(result["seeds"]) < 2:
        return "One seed: no interval, no statement about which differences are real."
    variants = list(dict.fromkeys(c["variant"] for c in comps))
    cell = {(c["variant"], c["metric"]): c for c in comps}
    rows, same = [], False
    for v in variants:
        values = []
        for m in _METRIC_NAMES:
            c = cell[(v, m)]
            if c["exceeds_spread"] is None:  # a zero-width interval: no ± 0.00 and no star
                same = True
                values.append(f"{100 * c['mean']:+.2f}†")
            else:
                star = "*" if c["exceeds_spread"] else ""
                values.append(f"{100 * c['mean']:+.2f} ± {100 * c['ci95']:.2f}{star}")
        rows.append(f"| {DISPLAY_NAMES[v]} | " + " | ".join(values) + " |")
    legend = "* the interval excludes 0" + ("; † the same difference in every seed (no spread to judge by)"
                                            if same else "")
    lines = [f"Difference to {DISPLAY_NAMES[reference]} (points, mean ± 95 % interval over the same "
             f"seeds; {legend})", "",
             "| variant | " + " | ".join(_METRIC_NAMES.values()) + " |",
             "|---|" + "---:|" * len(_METRIC_NAMES)]
    return "\n".join(lines + rows)


def format_runtime_table(result: dict[str, Any]) -> str:
    """Markdown table of training time per image (ms): model forward/backward, head alone."""
    rows = [r for r in result["rows"] if "forward_ms" in r]
    if not rows:
        return ""
    m = result["machine"]
    # (A step holds at most the training set: 90 images with --train-fraction 0.05.)
    per_step = min(result['config']['timing_batch_size'], result['n_train'])
    lines = [f"Time per image (ms), median of {result['config']['timing_batches']} training steps of "
             f"{per_step} images, {_spread(result)}; {m['device']}, "
             f"{_threads(m)}", "",
             "| variant | forward | backward | head forward | head backward |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        values = [format_mean_std({"mean": row[t], "std": row[f"{t}_std"], "n": row["seeds"]},
                                  scale=1.0, digits=4)
                  for t in ("forward_ms", "backward_ms", "head_forward_ms", "head_backward_ms")]
        lines.append(f"| {DISPLAY_NAMES[row['variant']]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Grouped bars (mean ± std) of top-1, mAP and ECE per variant, and the time per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [DISPLAY_NAMES[r["variant"]] for r in rows]
    has_time = all("forward_ms" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if has_time else 2, figsize=(15 if has_time else 10, 4.2),
                             gridspec_kw={"width_ratios": [2, 1, 1] if has_time else [2, 1]})
    groups = ("top1", "map", "map_softmax")
    width = 0.8 / len(rows)
    ax = axes[0]
    lows = []
    for i, row in enumerate(rows):
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        mean = [100 * row[m] for m in groups]
        std = [100 * row[f"{m}_std"] for m in groups]
        lows += [a - b for a, b in zip(mean, std)]
        ax.bar(xs, mean, width * 0.95, yerr=std, capsize=2, label=names[i])
    ax.set_xticks(range(len(groups)), [_METRIC_NAMES[g] for g in groups])
    ax.set_ylim(max(0.0, min(lows) - 1.0), 100)  # the differences are small: zoom in
    ax.set_ylabel("%")
    ax.grid(alpha=0.3, axis="y")
    # The legend goes under the panels: the bars reach the top of the zoomed axis.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    ax = axes[1]
    ax.bar(range(len(rows)), [100 * r["ece"] for r in rows], yerr=[100 * r["ece_std"] for r in rows],
           capsize=2, color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("expected calibration error (%)")
    ax.grid(alpha=0.3, axis="y")
    if has_time:
        ax = axes[2]
        fwd = [1e3 * r["forward_ms"] for r in rows]
        bwd = [1e3 * r["backward_ms"] for r in rows]
        ax.bar(range(len(rows)), fwd, color="#4c72b0", label="forward")
        ax.bar(range(len(rows)), bwd, bottom=fwd, color="#dd8452", label="backward")
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("µs per image (training step)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Lp projections before the last layer, digits CNN ({_spread(result)})")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def write(result: dict[str, Any], out: str) -> dict[str, str]:
    """Write ``projection.json`` and ``projection.png`` into ``out``; return their paths."""
    return write_result(result, out, "projection", plot)
