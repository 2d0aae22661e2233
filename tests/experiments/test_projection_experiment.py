"""Tests of the projection experiment (Table 6): digits, CNN heads, radius, metrics, CLI.

Named ``test_projection_experiment.py``: ``test_projection.py`` is the library's test of
the projection node, and test basenames must be unique (no ``__init__.py`` in tests).
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("sklearn", reason="the projection experiment reads scikit-learn's bundled digits")

from convexddn import cli  # noqa: E402
from convexddn.errors import OptionError, ShapeError  # noqa: E402
from convexddn.experiments import projection  # noqa: E402
from convexddn.experiments.projection import Config, DigitsCNN, VARIANTS, run  # noqa: E402
from convexddn.experiments.projection.config import variant_projection  # noqa: E402
from convexddn.experiments.projection.data import load_digits, split_digits  # noqa: E402
from convexddn.experiments.projection.protocol import evaluate, median_feature_norms  # noqa: E402
from convexddn.experiments.projection.runner import METRICS, TIMES, aggregate  # noqa: E402

# --------------------------------------------------------------------------------- data


def test_load_digits_is_the_bundled_set():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() == 0.0 and images.max() == 1.0  # pixel values 0..16 scaled by 1/16


def test_split_is_stratified_disjoint_standardised_and_seeded():
    tx, ty, vx, vy = split_digits(0.1, seed=0)
    counts = torch.bincount(load_digits()[1], minlength=10)
    train_counts = torch.bincount(ty, minlength=10)
    # round(0.1 * n_c) training images per class; everything else is test.
    assert train_counts.tolist() == [round(0.1 * int(n)) for n in counts]
    assert len(ty) + len(vy) == 1797
    # Standardised with the training statistics: mean 0, std 1 on the training split.
    assert abs(float(tx.mean())) < 1e-5 and abs(float(tx.std()) - 1.0) < 1e-5
    # Every label lands in exactly one split.
    assert torch.equal(torch.bincount(torch.cat((ty, vy)), minlength=10), counts)
    same = split_digits(0.1, seed=0)
    other = split_digits(0.1, seed=1)
    assert torch.equal(same[0], tx) and not torch.equal(other[1], ty)
    for bad in (0.0, 1.0, -0.5, True):
        with pytest.raises(OptionError):
            split_digits(bad, seed=0)


# -------------------------------------------------------------------------------- model


@pytest.mark.parametrize("variant", VARIANTS)
def test_cnn_forward_backward_every_variant(variant):
    torch.manual_seed(0)
    radius = None if variant_projection(variant) is None else 3.0
    model = DigitsCNN(variant, radius=radius, width=4)
    x = torch.randn(6, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (6, 10) and logits.dtype == torch.float32
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.features.parameters()]
    # The gradient reaches the convolutions through the head (normalisation + projection).
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_variants_share_parameters():
    counts = {v: sum(p.numel() for p in DigitsCNN(v, radius=None if variant_projection(v) is None
                                                   else 1.0, width=4).parameters()) for v in VARIANTS}
    assert len(set(counts.values())) == 1


@pytest.mark.parametrize("variant", ["l1_sphere", "l2_sphere", "linf_sphere"])
def test_sphere_head_output_has_the_radius(variant):
    # The features leaving a sphere head have Lp norm exactly r (closed form check).
    torch.manual_seed(0)
    p, _ = variant_projection(variant)
    model = DigitsCNN(variant, radius=2.5, width=4).eval()
    z = model.project(model.embed(torch.randn(5, 1, 8, 8)))
    torch.testing.assert_close(torch.linalg.vector_norm(z, ord=p, dim=1), torch.full((5,), 2.5))


def test_ball_head_is_identity_inside():
    model = DigitsCNN("l2_ball", radius=1e6, width=4).eval()
    z = model.embed(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(model.project(z), z)


def test_cnn_invalid():
    with pytest.raises(OptionError):
        DigitsCNN("l3_sphere", radius=1.0)
    with pytest.raises(OptionError):
        DigitsCNN("l2_ball")  # needs a radius
    with pytest.raises(OptionError):
        DigitsCNN("l2_ball", radius=0.0)
    with pytest.raises(OptionError):
        DigitsCNN("baseline", radius=1.0)  # no projection to take it
    with pytest.raises(ShapeError):
        DigitsCNN("baseline", width=4)(torch.zeros(2, 3, 8, 8))


# ------------------------------------------------------------------ radius and metrics


def test_median_feature_norms_closed_form():
    # A model whose embedding is the identity on known vectors: the medians are exact.
    class Fixed(torch.nn.Module):
        def embed(self, x):
            return x

    z = torch.tensor([[3.0, -4.0], [1.0, 0.0], [-6.0, 8.0]])
    medians = median_feature_norms(Fixed(), z)
    # L1 norms 7, 1, 14 -> 7; L2 norms 5, 1, 10 -> 5; L∞ norms 4, 1, 8 -> 4.
    assert medians == pytest.approx({"l1": 7.0, "l2": 5.0, "linf": 4.0})


def test_evaluate_metrics_on_known_logits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    # Three 3-class samples, all predicted right with confidence ~1.
    logits = torch.tensor([[20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0]])
    m = evaluate(Fixed(), logits, torch.tensor([0, 1, 2]), ece_bins=10)
    assert m["top1"] == 1.0 and m["top5"] == 1.0
    assert m["map"] == pytest.approx(1.0) and m["map_softmax"] == pytest.approx(1.0)
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)


def _record(seed, top1):
    base = {m: 0.5 for m in METRICS}
    return {"seed": seed, "n_train": 1, "n_test": 1, "radii": {},
            "variants": [{"variant": v, "radius": None if v in ("baseline", "bn") else 2.0,
                          "train_seconds": 1.0, "warnings": {}, **base, "top1": a,
                          **{t: 1.0 for t in TIMES}} for v, a in top1.items()]}


def test_aggregate_paired_comparisons_against_baseline_and_bn():
    per_seed = [_record(0, {"baseline": 0.90, "bn": 0.91, "l2_sphere": 0.93}),
                _record(1, {"baseline": 0.80, "bn": 0.83, "l2_sphere": 0.82}),
                _record(2, {"baseline": 0.70, "bn": 0.70, "l2_sphere": 0.73})]
    out = aggregate(per_seed)
    rows = {r["variant"]: r for r in out["rows"]}
    assert rows["baseline"]["top1"] == pytest.approx(0.8) and rows["baseline"]["top1_std"] == pytest.approx(0.1)
    assert rows["l2_sphere"]["radius"] == 2.0 and rows["bn"]["radius"] is None
    comp = {(c["variant"], c["reference"], c["metric"]): c for c in out["comparisons"]}
    # l2_sphere − baseline = 0.03, 0.02, 0.03: mean 0.0267, the interval excludes 0.
    c = comp[("l2_sphere", "baseline", "top1")]
    assert c["mean"] == pytest.approx(0.08 / 3) and c["exceeds_spread"] is True
    # l2_sphere − bn = 0.02, -0.01, 0.03: the interval contains 0.
    assert comp[("l2_sphere", "bn", "top1")]["exceeds_spread"] is False
    # Identical metrics: a zero difference does not exceed a zero spread.
    assert comp[("l2_sphere", "baseline", "map")]["exceeds_spread"] is False
    assert ("bn", "bn", "top1") not in comp and ("baseline", "bn", "top1") not in comp


def test_format_comparisons_marks_the_same_difference_in_every_seed():
    """A difference identical in every seed has a zero-width interval and no verdict
    (exceeds_spread None): it printed as "+2.00 ± 0.00" with no star, under a legend
    saying a star marks an interval that excludes 0."""
    from convexddn.experiments.projection.report import format_comparisons

    per_seed = [_record(0, {"baseline": 0.50, "l2_sphere": 0.52}),
                _record(1, {"baseline": 0.25, "l2_sphere": 0.27}),
                _record(2, {"baseline": 0.75, "l2_sphere": 0.77})]
    result = {"seeds": [0, 1, 2], **aggregate(per_seed)}
    table = format_comparisons(result, "baseline")
    row = next(line for line in table.splitlines() if line.startswith("| L2 sphere"))
    top1 = row.split("|")[2].strip()
    assert top1 == "+2.00†"
    assert "† the same difference in every seed (no spread to judge by)" in table
    # A difference that is 0 in every seed still reads as one that does not exceed the spread.
    assert row.split("|")[4].strip() == "+0.00 ± 0.00"


def test_cli_one_seed_says_so_once(monkeypatch, capsys):
    """With one seed both comparison blocks (to the baseline, to BN) are the same sentence,
    which was printed twice."""
    from convexddn.experiments.projection import command, runner

    result = {"seeds": [0], "config": {"epochs": 1, "timing_batch_size": 16, "timing_batches": 1},
              "n_train": 10, "n_test": 10, "wall_seconds": 1.0,
              "machine": {"device": "cpu", "torch_threads": 1, "cpu_count": 2, "torch": "t"},
              **aggregate([_record(0, {"baseline": 0.5, "bn": 0.6, "l2_ball": 0.7})])}
    monkeypatch.setattr(runner, "run", lambda cfg: result)
    assert command._execute(Config(seeds=1, out=None)) == 0
    out = capsys.readouterr().out
    assert out.count("One seed: no interval") == 1 and "| L2 ball |" in out


# ---------------------------------------------------------------------------- end to end


def test_run_two_variants_learns_and_sets_radius(tmp_path):
    cfg = Config(variants=("baseline", "l2_sphere"), epochs=6, width=8, seeds=2, timing_batches=1,
                 timing_batch_size=16, out=str(tmp_path), progress=False, preset="tiny")
    result = run(cfg)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "l2_sphere"}
    # Chance is 10 %: a few epochs must do far better.
    assert rows["baseline"]["top1"] > 0.6 and rows["l2_sphere"]["top1"] > 0.6
    # The radius is the median L2 norm of the BN features (≈ sqrt(32) for 32 unit-variance
    # features), set per seed from the BN-only model, which is trained but not reported.
    for radii in result["radii"]:
        assert 0.3 * math.sqrt(32) < radii["l2"] < 1.5 * math.sqrt(32)
    assert rows["l2_sphere"]["radius"] == pytest.approx(sum(r["l2"] for r in result["radii"]) / 2)
    saved = json.loads((tmp_path / "projection.json").read_text())
    assert saved["rows"] == result["rows"] and (tmp_path / "projection.png").stat().st_size > 10_000
    # The runtime header names the images a timed step held (at most the training set:
    # it printed timing_batch_size where the set was smaller).
    small = {**result, "n_train": 12}
    assert "training steps of 12 images" in projection.format_runtime_table(small)
    assert "training steps of 16 images" in projection.format_runtime_table(result)


def test_run_is_reproducible():
    cfg = Config(variants=("l1_sphere",), epochs=1, width=4, seeds=1, timing_batches=0, out=None,
                 progress=False)
    a, b = run(cfg), run(cfg)
    assert a["rows"][0]["top1_per_seed"] == b["rows"][0]["top1_per_seed"]
    assert a["rows"][0]["map_per_seed"] == b["rows"][0]["map_per_seed"] and a["radii"] == b["radii"]


def test_cli_quick_preset_writes_every_row(tmp_path, capsys):
    # The --quick preset exactly as a user runs it (the CI smoke test of the experiment).
    assert cli.main(["experiment", "projection", "--quick", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "\r" not in captured.err  # stderr is not a terminal: no progress bars
    assert "| variant | radius | top-1 |" in out and "Difference to baseline" in out
    assert "Time per image (ms)" in out
    result = json.loads((tmp_path / "projection.json").read_text())
    quick = Config.quick()
    assert result["config"]["preset"] == "quick" and result["seeds"] == quick.seed_list
    assert [r["variant"] for r in result["rows"]] == list(quick.variants)
    for row in result["rows"]:
        for m in METRICS:
            assert 0.0 <= row[m] <= 1.0 and len(row[f"{m}_per_seed"]) == quick.seeds
            assert row[f"{m}_std"] >= 0.0 and row[f"{m}_ci95"] >= 0.0
        for t in TIMES:
            assert row[t] > 0
        assert (row["radius"] is None) == (variant_projection(row["variant"]) is None)
    n_vs_baseline = (len(quick.variants) - 1) * len(METRICS)
    n_vs_bn = (len(quick.variants) - 2) * len(METRICS)
    assert len(result["comparisons"]) == n_vs_baseline + n_vs_bn
    assert (tmp_path / "projection.png").stat().st_size > 10_000


def test_config_from_args():
    parser = argparse.ArgumentParser()
    projection.add_arguments(parser)
    args = parser.parse_args(["--quick", "--seeds", "4", "--seed", "2", "--epochs", "1", "--variants",
                              "baseline,l1_ball", "--train-fraction", "0.2", "--radius-scale", "0.5",
                              "--threads", "1", "--timing-batches", "0"])
    cfg = projection.config_from_args(args)
    assert (cfg.preset, cfg.seeds, cfg.seed, cfg.epochs, cfg.variants, cfg.train_fraction,
            cfg.radius_scale, cfg.threads, cfg.timing_batches) == (
        "quick", 4, 2, 1, ("baseline", "l1_ball"), 0.2, 0.5, 1, 0)
    assert projection.config_from_args(parser.parse_args([])) == Config(preset="default")


@pytest.mark.parametrize(
    "kw",
    [dict(variants=("baseline", "l3_ball")), dict(variants=()), dict(variants=("bn", "bn")),
     dict(train_fraction=1.0), dict(train_fraction=0.0), dict(epochs=0), dict(seeds=0),
     dict(batch_size=1), dict(lr=0.0), dict(radius_scale=-1.0), dict(momentum=-0.1),
     dict(weight_decay=float("nan")), dict(timing_batches=-1), dict(timing_batch_size=1),
     dict(width=0), dict(ece_bins=0), dict(threads=0), dict(device="tpu")],
)
def test_config_invalid(kw):
    with pytest.raises(OptionError):
        run(Config(out=None, progress=False, **kw))


@pytest.mark.parametrize("argv", [["--variants", "l3_ball"], ["--seeds", "0"], ["--device", "tpu"], ["--device", ""],
                                  ["--train-fraction", "1.5"]])
def test_cli_user_mistake_one_line_exit_2(argv, capsys, tmp_path):
    assert cli.main(["experiment", "projection", "--quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convexddn experiment projection: error:")
    assert not (tmp_path / "projection.json").exists()


def test_missing_scikit_learn_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    out = tmp_path / "out"
    assert cli.main(["experiment", "projection", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install scikit-learn" in err[0]
    assert not out.exists()  # the missing dependency is found before the out directory is made


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_gpu(capsys):
    with pytest.raises(OptionError, match="CUDA"):
        run(Config(device="cuda", out=None, progress=False))
    assert cli.main(["experiment", "projection", "--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_on_cuda():
    cfg = Config.quick(variants=("baseline", "bn", "l1_sphere", "linf_ball"), out=None, progress=False)
    cfg.device = "cuda"
    result = run(cfg)
    assert result["machine"]["device"].startswith("cuda") and len(result["rows"]) == 4
    assert all(r["forward_ms"] > 0 for r in result["rows"])


@pytest.mark.parametrize("options", [dict(width=2.5), dict(width=0.5), dict(num_classes=3.9)])
def test_digits_cnn_refuses_fractional_sizes(options):
    from convexddn.errors import OptionError

    # Were truncated (width 0.5: a network with no channels).
    with pytest.raises(OptionError, match=next(iter(options))):
        DigitsCNN("baseline", **options)
