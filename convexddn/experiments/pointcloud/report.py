"""Report of the point-cloud experiment: markdown tables, the plot, the JSON file."""
from __future__ import annotations

from typing import Any

from ..running import save_figure, write_result
from ..stats import format_mean_std
from .config import DISPLAY_NAMES

__all__ = ["format_table", "format_runtime_table", "format_comparisons", "plot", "write"]



def _threads(machine: dict[str, Any]) -> str:
    n = machine["torch_threads"]
    return f"{n} torch thread{'s' if n != 1 else ''}"

def _caption(result: dict[str, Any]) -> str:
    protocol = ("trained without outliers, tested with outliers (Table 4 protocol)"
                if result["protocol"] == "test_outliers_only"
                else "same outlier rate in training and testing (Table 3 protocol)")
    n = len(result["seeds"])
    spread = f"mean ± std over {n} seeds" if n > 1 else "one seed"
    return f"{protocol}; {spread}; {result['n_test']} test clouds per seed, {len(result['classes'])} classes"


def _grid(result: dict[str, Any]) -> tuple[list[str], list[float], dict[tuple[str, float], dict]]:
    poolings = list(dict.fromkeys(r["pooling"] for r in result["rows"]))
    rates = sorted({r["rate"] for r in result["rows"]})
    cell = {(r["pooling"], r["rate"]): r for r in result["rows"]}
    return poolings, rates, cell


def _tied_with_best(result: dict[str, Any]) -> set[tuple[str, float]]:
    """Cells that are the best at their rate or not distinguishable from it (paired 95 %)."""
    marked = set()
    for c in result.get("comparisons", []):
        if c["metric"] != "accuracy":
            continue
        marked.add((c["best"], c["rate"]))
        for pooling, diff in c["versus"].items():
            if diff["exceeds_spread"] is False:
                marked.add((pooling, c["rate"]))
    return marked


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables of top-1 accuracy and mAP (in %), rows = outlier rate, columns = pooling.

    In the accuracy table, bold marks the best pooling at each rate and every pooling
    whose paired difference to it does not exceed the spread over seeds.
    """
    blocks = []
    bold = _tied_with_best(result) if len(result["seeds"]) > 1 else set()
    for key, title in (("accuracy", "Top-1 accuracy (%)"), ("map", "Mean average precision (%)")):
        poolings, rates, cell = _grid(result)
        lines = [f"{title}, {_caption(result)}", "",
                 "| outliers | " + " | ".join(DISPLAY_NAMES[p] for p in poolings) + " |",
                 "|---:|" + "---:|" * len(poolings)]
        for rate in rates:
            values = []
            for p in poolings:
                row = cell.get((p, rate))
                if row is None:
                    values.append("–")
                    continue
                text = format_mean_std({"mean": row[key], "std": row[f"{key}_std"], "n": row["seeds"]})
                values.append(f"**{text}**" if key == "accuracy" and (p, rate) in bold else text)
            lines.append(f"| {100 * rate:g} % | " + " | ".join(values) + " |")
        if key == "accuracy" and bold:
            lines += ["", "Bold: the best pooling at that rate, and those whose paired difference to it "
                          "(same seeds) has a 95 % interval containing 0."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_runtime_table(result: dict[str, Any]) -> str:
    """Markdown table of training time per cloud (ms): data / forward / backward (Table 5).

    Each cell is the median over seeds, with the range over seeds in brackets: another
    process on the machine slows a whole seed's timed steps, and the median of three
    seeds ignores one such seed where a mean would not.
    """
    if not result.get("runtime"):
        return ""
    rates = sorted({r["rate"] for r in result["runtime"]})
    poolings = list(dict.fromkeys(r["pooling"] for r in result["runtime"]))
    cell = {(r["pooling"], r["rate"]): r for r in result["runtime"]}
    n = len(result["seeds"])
    names = ("data", "forward", "backward", "total")
    header = "| pooling | " + " | ".join(f"{name} {100 * rate:g} %" for rate in rates for name in names) + " |"
    over = f"median [range] over {n} seeds" if n > 1 else "one seed"
    lines = [f"Training time per point cloud (ms): data / forward / backward, median step of "
             f"{result['config']['timing_batches']} timed batches of {result['config']['batch_size']}, "
             f"{over}; {result['machine']['device']}, {_threads(result['machine'])}", "", header,
             "|---|" + "---:|" * (4 * len(rates))]
    for p in poolings:
        values = []
        for rate in rates:
            row = cell.get((p, rate))
            for name in ("data_ms", "forward_ms", "backward_ms", "total_ms"):
                if row is None:
                    values.append("–")
                elif row["seeds"] > 1:
                    values.append(f"{row[name]:.2f} [{row[name + '_min']:.2f}–{row[name + '_max']:.2f}]")
                else:
                    values.append(f"{row[name]:.2f}")
        lines.append(f"| {DISPLAY_NAMES[p]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def format_comparisons(result: dict[str, Any]) -> str:
    """One line per rate: the best pooling and which differences to it exceed the spread."""
    if len(result["seeds"]) < 2:
        return "One seed: no interval, no statement about which differences are real."
    lines = ["Paired differences in top-1 accuracy to the best pooling at each rate "
             "(points, mean ± 95 % interval over seeds):", ""]
    for c in sorted(result["comparisons"], key=lambda c: (c["train_rate"], c["rate"])):
        real = [f"{DISPLAY_NAMES[p]} −{100 * d['mean']:.1f} ± {100 * d['ci95']:.1f}"
                for p, d in c["versus"].items() if d["exceeds_spread"]]
        tied = [DISPLAY_NAMES[p] for p, d in c["versus"].items() if d["exceeds_spread"] is False]
        same = [f"{DISPLAY_NAMES[p]} −{100 * d['mean']:.1f}"
                for p, d in c["versus"].items() if d["exceeds_spread"] is None]
        line = f"- {100 * c['rate']:g} %: best {DISPLAY_NAMES[c['best']]}"
        if not c["versus"]:  # (one pooling ran: nothing compared, nothing to claim)
            lines.append(line + "; no other pooling ran")
            continue
        line += f"; within the spread: {', '.join(tied)}" if tied else "" if same else "; every other pooling is worse"
        line += f"; worse beyond the spread: {', '.join(real)}" if real else ""
        line += f"; the same difference in every seed (no spread to judge by): {', '.join(same)}" if same else ""
        lines.append(line)
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy and mAP vs outlier rate (mean, band ± std) and the runtime bars, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    has_runtime = bool(result.get("runtime"))
    fig, axes = plt.subplots(1, 3 if has_runtime else 2, figsize=(15 if has_runtime else 10, 4.2))
    poolings, rates, cell = _grid(result)
    xlabel = ("outliers in test (%)" if result["protocol"] == "test_outliers_only"
              else "outliers in training and test (%)")
    for ax, key, label in ((axes[0], "accuracy", "top-1 accuracy (%)"), (axes[1], "map", "mAP (%)")):
        for p in poolings:
            rs = [r for r in rates if (p, r) in cell]
            xs = [100 * r for r in rs]
            mean = [100 * cell[(p, r)][key] for r in rs]
            std = [100 * cell[(p, r)][f"{key}_std"] for r in rs]
            (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=DISPLAY_NAMES[p])
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.18, linewidth=0)
        ax.axhline(100 / len(result["classes"]), color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    # One legend under the panels: inside, it would hide some curve at some rate.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if has_runtime:
        _plot_runtime(axes[2], result)
    n = len(result["seeds"])
    protocol = ("trained without outliers" if result["protocol"] == "test_outliers_only"
                else "same outlier rate in training and test")
    spread = f"mean ± std over {n} seeds" if n > 1 else "one seed"
    fig.suptitle(f"PointNet on generated shapes, {protocol} ({spread})")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def _plot_runtime(ax: Any, result: dict[str, Any]) -> None:
    rates = sorted({r["rate"] for r in result["runtime"]})
    poolings = list(dict.fromkeys(r["pooling"] for r in result["runtime"]))
    cell = {(r["pooling"], r["rate"]): r for r in result["runtime"]}
    width = 0.8 / len(rates)
    colors = {"data_ms": "#999999", "forward_ms": "#4c72b0", "backward_ms": "#dd8452"}
    for j, rate in enumerate(rates):
        xs = [i + (j - (len(rates) - 1) / 2) * width for i in range(len(poolings))]
        bottom = [0.0] * len(poolings)
        for name, color in colors.items():
            h = [cell[(p, rate)][name] if (p, rate) in cell else 0.0 for p in poolings]
            ax.bar(xs, h, width * 0.95, bottom=bottom, color=color, alpha=1.0 if j == 0 else 0.6,
                   label=f"{name[:-3]} ({100 * rate:g} %)")
            bottom = [b + v for b, v in zip(bottom, h)]
    ax.set_xticks(range(len(poolings)), [DISPLAY_NAMES[p] for p in poolings], fontsize=8, rotation=20)
    ax.set_ylabel("training ms per cloud")
    ax.set_title("runtime: data / forward / backward", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")


def write(result: dict[str, Any], out: str) -> dict[str, str]:
    """Write ``pointcloud.json`` and ``pointcloud.png`` into ``out``; return their paths."""
    return write_result(result, out, "pointcloud", plot)
