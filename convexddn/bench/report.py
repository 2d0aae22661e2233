"""The report of ``convexddn bench``: markdown table, JSON, plot."""
from __future__ import annotations

import math
from typing import Any

from ..experiments.running import save_figure
from .cases.common import SHAPES

__all__ = ["estimate_skipped", "format_table", "plot"]


def estimate_skipped(rows: list[dict]) -> None:
    """Fill the skipped cvxpy rows' notes with the time the small shape's per-row rate
    predicts (linear in rows and row length): an estimate, not a bound (larger batches
    cost less per row, longer rows more than linearly)."""
    for i, note in _skipped_notes(rows).items():
        rows[i]["note"] = note


def _skipped_notes(rows: list[dict]) -> dict[int, str]:
    """The note of each skipped cvxpy row (by index in ``rows``), from the figures of the
    rows: :func:`format_table` renders them afresh, so a JSON written by an older
    formatter prints as the current one would."""
    small = {(r["family"], r["node"]): r for r in rows
             if r["path"] == "cvxpy" and r["fwd_ms_per_sample"] is not None}
    notes = {}
    for i, r in enumerate(rows):
        ref = small.get((r["family"], r["node"]))
        if r["path"] == "cvxpy" and r["fwd_ms_per_sample"] is None and ref is not None:
            per_row = (ref["fwd_ms_per_sample"] + ref["bwd_ms_per_sample"]) / (
                ref["shape"][1] if r["family"] == "pooling" else 1)
            n_rows = math.prod(r["shape"][:-1])
            scale = r["shape"][-1] / ref["shape"][-1]  # at least linear in the row length
            seconds = per_row * n_rows * scale / 1e3
            notes[i] = (f"skipped: {n_rows} cone programs of size {r['shape'][-1]}; "
                        f"about {_duration(seconds)} at the small shape's rate")
    return notes


def _duration(seconds: float) -> str:
    """An estimated duration in the unit that shows it, to about two digits: seconds below
    a minute ("about 0.0 min" was printed for a few seconds), minutes below an hour, then
    hours."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def _first_call(r: dict) -> str:
    """The first call's time at this shape and what it costs over a warm call (the goal's
    measure). The shapes run in one process, smallest first: only the first shape's is
    the process's first call."""
    # Both figures in milliseconds' precision: "0.0 s (+0.01 s over a warm call)" showed
    # the first call in tenths beside the difference in hundredths. (+ 0.0: no "-0.000".)
    text = f"first call at this shape {round(r['first_call_s'], 3) + 0.0:.3f} s"
    if r.get("first_call_over_warm_s") is not None:
        text += f" ({round(r['first_call_over_warm_s'], 3) + 0.0:+.3f} s over a warm call)"
    return text


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "ms":
        return f"{v:.3g}"
    if kind == "x":
        return f"{v:.2f}×"
    return f"{v:.1e}"


def _ddn_figures(r: dict) -> dict[str, dict]:
    """A pooling row's figures against the reference by the dtype they were measured in:
    the row's own dtype, and float64 where a float32 run also compared in float64."""
    out = {r.get("dtype", "float32"): r}
    if r.get("ddn_float64"):
        out.setdefault("float64", r["ddn_float64"])
    return out


def _ddn_table(rows: list[dict]) -> list[str]:
    """Robust pooling against the DDN reference, measured in the same run (reference
    time ÷ ours; the range over rounds in brackets), with the goals of ≥ 10× forward
    and ≥ 1.5× backward. Each column is labelled with the dtype its figures were measured
    in (the header said float32 | float64 whatever they were: a float64 run's figures sat
    under "float32"); a penalty whose reference call raised is named below the table."""
    pooling = [r for r in rows if r["family"] == "pooling"]
    rows = [r for r in pooling if any("fwd_speedup_vs_ddn" in f for f in _ddn_figures(r).values())]
    raised = [f"{r['node']} at {tuple(r['shape'])}, {dtype}: {fig['ddn_error']}" for r in pooling
              for dtype, fig in _ddn_figures(r).items() if fig.get("ddn_error")]
    raised_lines = [f"Not measured for {text}." for text in raised]
    if not rows:
        # Not measured: say why (the reference not importable, or its calls raised), not nothing.
        why = next((r["ddn_reference"] for r in pooling if r.get("ddn_reference")), None)
        if raised:
            return ["### robust pooling against the DDN reference", ""] + raised_lines + [""]
        return ["### robust pooling against the DDN reference", "", f"Not measured: {why}.", ""] if why else []
    dtypes = sorted({d for r in rows for d in _ddn_figures(r)}, key=lambda d: (d != "float32", d))
    out = ["### robust pooling against the DDN reference (reference time ÷ ours, same run, same inputs)", "",
           "| penalty | shape | " + " | ".join(f"fwd {d} | bwd {d}" for d in dtypes)
           + " | goal fwd ≥ 10×, bwd ≥ 1.5× |",
           "|---|---|" + "---:|---:|" * len(dtypes) + "---|"]

    def ratio(fig: dict | None, key: str) -> str:
        if not fig or key not in fig:
            return "—"
        lo, hi = fig.get(f"{key}_range", (None, None))
        return f"{fig[key]:.3g}×" + (f" [{lo:.3g}–{hi:.3g}]" if lo is not None else "")

    for r in rows:
        figs = _ddn_figures(r)
        met = [fig["ddn_goal_met"] for fig in figs.values() if "ddn_goal_met" in fig]
        cells = " | ".join(f"{ratio(figs.get(d), 'fwd_speedup_vs_ddn')} | {ratio(figs.get(d), 'bwd_speedup_vs_ddn')}"
                           for d in dtypes)
        # (a dtype whose reference call raised is not measured: no ✓ from the other's figures alone)
        mark = "—" if any(fig.get("ddn_error") for fig in figs.values()) else "✓" if met and all(met) else "✗"
        out.append(f"| {r['node']} | {tuple(r['shape'])} | {cells} | {mark} |")
    return out + [""] + (raised_lines + [""] if raised else [])


# How memory_probe measured the peak (rows written before "peak_method" were sampled).
_METHODS = {
    "hwm": "the kernel's high-water mark of the resident set (VmHWM), reset just before the call",
    "sampled": "the resident set sampled every 0.5 ms (no /proc/self/clear_refs here: a shorter peak "
               "can be missed)",
}


# The probe's allocator setting (see harness.peak_memory), which the figures depend on.
_MALLOC = ("Each probe runs with MALLOC_MMAP_THRESHOLD_=65536 (glibc maps blocks of 64 KiB and more on their "
           "own, so freed memory leaves the resident set at once and the peak is what was live); with glibc's "
           "default adaptive threshold freed temporaries stay in the heap and count too.")


def below_floor(r: dict) -> bool:
    """Whether a memory row shows less than the 1× floor (as printed, to 2 decimals): the
    materialised gradient alone is one input-sized tensor, so such a figure missed the
    peak and says nothing about the node."""
    return round(r["peak_over_input"], 2) < 1.0


def _memory_table(rows: list[dict]) -> list[str]:
    out = ["### memory (forward + backward, fresh process each)", "",
           "| node | shape | peak added / input size |", "|---|---|---:|"]
    for r in rows:
        flag = " (below the 1× floor: unreliable)" if below_floor(r) else ""
        out.append(f"| {r['node']} | {tuple(r['shape'])} | {r['peak_over_input']:.2f}×{flag} |")
    methods = sorted({r.get("peak_method", "sampled") for r in rows})
    out += ["", "Peak: " + "; ".join(_METHODS.get(m, m) for m in methods) + "; the gradient materialised. " + _MALLOC]
    if any(below_floor(r) for r in rows):
        out.append("A figure below 1× is no saving: the gradient alone is one input-sized tensor, so the "
                   "measurement came short of the peak. The kernel's resident-set figures can come a few "
                   "hundred KB short, a large part of a small input (seen: 0.00–0.69× at (4, 64, 256), "
                   "≥ 0.999× at (24, 1024, 2048)); the sampler misses peaks shorter than 0.5 ms.")
    return out + [""]


# A backward with at least this many page faults (4 MiB of fresh pages) gets its count printed.
_MANY_FAULTS = 1024


def format_table(result: dict[str, Any]) -> str:
    lines = []
    # Shapes where some backward took many page faults: there every row says how many.
    faulted = {tuple(r["shape"]) for r in result["rows"] if (r.get("bwd_page_faults") or 0) >= _MANY_FAULTS}
    skipped = _skipped_notes(result["rows"])
    for family in ("pooling", "projection"):
        lines += [f"### {family}", "",
                  "| node | path | shape | fwd ms/sample | bwd ms/sample | fwd / mean | bwd / mean "
                  "| max Δ solution | max Δ gradient | note |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for i, r in enumerate(result["rows"]):
            if r["family"] != family:
                continue
            note = skipped.get(i, r["note"])
            if "first_call_s" in r:
                note = _first_call(r)
            if "goal" in r:
                note = (f"{'✓' if r['goal_met'] else '✗'} goal {r['goal']} "
                        f"(fwd {r['fwd_rel_goal_base']:.2f}× {r['goal_base']})")
                if "fwd_bwd_rel_goal_base" in r:
                    note += f"; fwd+bwd {r['fwd_bwd_rel_goal_base']:.2f}× {r['goal_base']}"
                if "first_call_s" in r:
                    note += f"; {_first_call(r)}"
                if "speedup_vs_ddn_reference" in r:
                    note += f"; forward {r['speedup_vs_ddn_reference']:.3g}× the DDN reference's speed"
            if tuple(r["shape"]) in faulted and r.get("bwd_page_faults") is not None:
                note += f"{'; ' if note else ''}backward {r['bwd_page_faults']:,} page faults/call"
            lines.append(
                f"| {r['node']} | {r['path']} | {tuple(r['shape'])} | {_fmt(r['fwd_ms_per_sample'], 'ms')} "
                f"| {_fmt(r['bwd_ms_per_sample'], 'ms')} | {_fmt(r['fwd_rel_mean'], 'x')} "
                f"| {_fmt(r['bwd_rel_mean'], 'x')} | {_fmt(r['max_solution_diff'], 'e')} "
                f"| {_fmt(r['max_grad_diff'], 'e')} | {note} |")
        if family == "pooling" and faulted:
            lines += ["", "Page faults: the median count of minor page faults in one timed backward. A "
                      "fresh gradient the size of the input is faulted in a 4 KiB page at a time (about "
                      "2 ms/sample at (24, 1024, 2048) float32) unless glibc serves it from freed memory "
                      "it kept; which happens varies from call to call, so a backward's ratio to the "
                      "mean's compares like with like only where their counts match."]
        lines.append("")
    lines += _ddn_table(result["rows"])
    if result.get("convex"):
        lines += ["### convex path (float64, forward + backward, same inputs, interleaved, medians)", "",
                  "| problem | batch | path | fwd s | bwd s | ms per element | speed-up vs per element "
                  "| max Δ solution | max Δ gradient | note |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["convex"]:
            if "fwd_s" not in r:
                lines.append(f"| {r.get('description', r['problem'])} | {r.get('batch', '—')} | {r['path']} "
                             f"| — | — | — | — | — | — | {r.get('note', '')} |")
                continue
            per = 1e3 * (r["fwd_s"] + r["bwd_s"]) / r["batch"]
            note = r.get("note", "")
            if r.get("routed_per_element"):
                note = ("routed to the per-element path (too large for dense batched "
                        "factorisation on this device)")
            elif r.get("per_element_fallbacks") and r["path"].startswith("convexddn batched"):
                note = f"{r['per_element_fallbacks']} element(s) not certified by the batched iterations, re-solved"
            elif r.get("per_element_fallbacks"):
                note = f"{r['per_element_fallbacks']} element(s) in doubt, solved by the batched form"
            lines.append(
                f"| {r['description']} | {r['batch']} | {r['path']} | {r['fwd_s']:.3g} | {r['bwd_s']:.3g} "
                f"| {per:.3g} | {_fmt(r.get('speedup_vs_per_element'), 'x')} "
                f"| {_fmt(r['max_solution_diff'], 'e')} | {_fmt(r['max_grad_diff'], 'e')} | {note} |")
        lines += ["", "Δ: largest difference from the per-element path (which agrees with central "
                  "finite differences to ~1e-8 in tests/convex).", ""]
    if result.get("nodes"):
        lines += ["### node library (forward / backward, medians; reference ÷ ours where the DDN "
                  "reference is present)", "",
                  "| node | input | fwd ms | bwd ms | DDN reference fwd / bwd ms | speed-up fwd / bwd | note |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in result["nodes"]:
            ref = (f"{r['ref_fwd_ms']:.3g} / {r['ref_bwd_ms']:.3g}" if "ref_fwd_ms" in r else "—")
            speed = (f"{r['speedup_fwd']:.2f}× / {r['speedup_bwd']:.2f}×" if "speedup_fwd" in r else "—")
            lines.append(f"| {r['node']} | {r['shape']} | {r['fwd_ms']:.3g} | {r['bwd_ms']:.3g} | {ref} "
                         f"| {speed} | {r.get('note', '')} |")
        lines.append("")
    if result.get("memory"):
        lines += _memory_table(result["memory"])
    if result.get("workers"):
        lines += ["### per-element parallelism: worker processes and cvxpylayers' thread pool "
                  "(forward + backward, float64, interleaved rounds)", "",
                  "| problem | path | batch | 1 worker s | workers = cores s | speed-up | cores |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["workers"]:
            lines.append(f"| {r['problem']} | {r.get('path', 'ConvexLayer worker processes')} | {r['batch']} "
                         f"| {r['seconds_1_process']:.2f} | {r['seconds_workers']:.2f} | {r['speedup']:.2f}× "
                         f"| {r['cores']} |")
        lines.append("")
    lines += _footnote(result)
    return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"  # not "1 rounds"


def _footnote(result: dict[str, Any]) -> list[str]:
    """The machine and the rounds each kind of row was timed in, from the rows themselves
    where they record it: a capped kind says so, and a kind not in the run (the DDN
    reference at the paper's shape with --quick or without the reference) is not
    claimed."""
    m = result["machine"]
    repeats = result["repeats"]
    # Results written before the key record no rounds: these were the rounds then (kept as
    # literals on purpose: CONVEX_ROUNDS / DDN_PAPER_ROUNDS may change after them).
    rounds = result.get("rounds", {"convex": 3})  # (the DDN rounds: from the rows, below)
    convex_rounds = sorted({r["rounds"] for r in result.get("convex", []) if "rounds" in r})
    convex_span = (f"{convex_rounds[0]}–{convex_rounds[-1]} interleaved rounds by cost, each row's in "
                   "bench.json" if len(convex_rounds) > 1 else f"{convex_rounds[0]}" if convex_rounds
                   else f"at most {rounds['convex']}")
    if convex_rounds and repeats > rounds["convex"]:  # capped by CONVEX_ROUNDS
        # (a default run gives its cheap rows more, up to CONVEX_MAX_ROUNDS: "at most 3" beside "3–15" said both)
        convex_span += (f", of --repeats at most {rounds['convex']}: a round of its slow rows takes minutes"
                        if convex_rounds[-1] <= rounds["convex"] else
                        f", its slow rows at most {rounds['convex']} of the {repeats}: a round of them takes minutes")
    parts = [f"the convex path: {convex_span}"]
    paper = tuple(SHAPES["paper"][0])
    ddn_paper = sorted({r["ddn_rounds"] for r in result["rows"]
                        if r["family"] == "pooling" and tuple(r["shape"]) == paper and "ddn_rounds" in r})
    if ddn_paper:  # (none with --quick, or without the reference: nothing to claim)
        text = f"{ddn_paper[0]}" if len(ddn_paper) == 1 else f"{ddn_paper[0]}–{ddn_paper[-1]}"
        if ddn_paper[-1] < repeats:  # capped by DDN_PAPER_ROUNDS
            text += f" (of --repeats at most {ddn_paper[-1]}: its forward takes seconds there)"
        parts.append(f"the DDN reference at the paper's shape: {text}, its own interleaved rounds")
    # Worker rows written before they recorded their rounds ran workers_speedup's default, 3.
    worker_rounds = sorted({r.get("rounds", 3) for r in result.get("workers", [])})
    if worker_rounds and worker_rounds != [repeats]:
        parts.append(f"the worker-process rows: {', '.join(map(str, worker_rounds))}")
    parts.append("cone-program rows: see their note")
    threads = _count(m["torch_threads"], "thread")
    return [f"The pooling goals (× mean, × sort) apply at the paper's shape {paper}; "
            "see the README's Benchmarks.",
            f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']} "
            f"({threads}), device {m['device']}; medians of {_count(repeats, 'round')} "
            f"({'; '.join(parts)}); mean = `x.mean(-1)` of the same tensor."]


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    rows = [r for r in result["rows"] if r["fwd_ms_per_sample"] is not None and r["node"] != "sort"]
    # pooling panels first, small shape before large
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (-len(s), math.prod(s)))
    ncols = 2
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, 4.5 * nrows), squeeze=False)
    colors = {"native": "tab:blue", "cvxpy": "tab:orange", "torch": "tab:gray"}
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    for ax, shape in zip(axes.flat, shapes):
        sel = [r for r in rows if tuple(r["shape"]) == shape]
        labels = [f"{r['node']}\n({r['path']})" for r in sel]
        total = [r["fwd_ms_per_sample"] + (r["bwd_ms_per_sample"] or 0.0) for r in sel]
        ax.barh(range(len(sel)), total, color=[colors[r["path"]] for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()
        ax.set_xlabel("forward + backward, ms per sample (log)")
        ax.set_title(f"{sel[0]['family']} {shape}")
    fig.suptitle(f"convexddn bench ({result['machine']['device']}, torch {result['machine']['torch']})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
