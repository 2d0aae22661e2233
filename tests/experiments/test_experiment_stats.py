"""Tests of the experiments' shared parts: metrics, spread over seeds, run helpers."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from convexddn.errors import OptionError, ShapeError, SolverWarning
from convexddn.experiments.metrics import (
    average_precision,
    expected_calibration_error,
    mean_average_precision,
    top_k_accuracy,
)
from convexddn.experiments.running import (
    CountLibraryWarnings,
    resolve_device,
    run_command,
    show_progress,
    torch_threads,
)
from convexddn.experiments.stats import format_mean_std, paired_difference, summarize, t_quantile_975

# ------------------------------------------------------------------------ average precision


def test_map_perfect_scores_is_one():
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    scores = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.rand(6, 3)
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)


def test_map_constant_scores_is_prevalence():
    # All scores tied: a single threshold, precision = class prevalence.
    labels = torch.tensor([0, 0, 0, 1])
    ap = average_precision(torch.zeros(4, 2), labels)
    torch.testing.assert_close(ap, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert mean_average_precision(torch.zeros(4, 2), labels) == pytest.approx(0.5)


def test_map_hand_computed_rankings():
    labels = torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9], [0.6, 0.0]])
    # Class 0 ranking (by score): samples 0 (+), 1 (-), 2 (+), 3 (-):
    #   AP = (1/1 + 2/3) / 2 = 5/6.
    # Class 1 ranking: samples 2 (-), 1 (+), 0 (-), 3 (+): AP = (1/2 + 2/4) / 2 = 1/2.
    ap = average_precision(scores, labels)
    torch.testing.assert_close(ap, torch.tensor([5 / 6, 1 / 2], dtype=torch.float64))
    assert mean_average_precision(scores, labels) == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_map_reversed_ranking_and_ties():
    # Positives ranked last among four: AP = (1/3 + 2/4) / 2 = 5/12.
    labels = torch.tensor([1, 1, 0, 0])
    scores = torch.tensor([[0.0, 0.1], [0.0, 0.2], [0.0, 0.9], [0.0, 0.8]])
    assert average_precision(scores, labels)[1].item() == pytest.approx(5 / 12)
    # Ties between a positive and a negative share the precision of the whole group:
    # scores (+ 0.9), (- 0.5), (+ 0.5): precisions 1/1 and 2/3 -> AP = 5/6.
    labels = torch.tensor([1, 0, 1])
    scores = torch.tensor([[0.0, 0.9], [0.0, 0.5], [0.0, 0.5]])
    assert average_precision(scores, labels)[1].item() == pytest.approx(5 / 6)


def test_map_logits_and_softmax_rank_differently():
    # Per-class ranking across samples: the softmax divides each row by its own sum,
    # so it can reorder samples. Class 0: logits rank sample 1 (5.0) above sample 0
    # (4.0) but softmax ranks sample 0 (4 vs 0 -> 0.982) above sample 1 (5 vs 5 -> 0.5).
    logits = torch.tensor([[4.0, 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1])
    assert average_precision(logits, labels)[0].item() == pytest.approx(0.5)
    assert average_precision(logits.softmax(1), labels)[0].item() == pytest.approx(1.0)


def test_map_invalid_shapes():
    with pytest.raises(ShapeError):
        average_precision(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError):
        average_precision(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


def test_map_absent_class_is_excluded():
    labels = torch.tensor([0, 0, 1, 1])  # class 2 never occurs
    scores = torch.tensor([[1.0, 0, 0], [0.9, 0, 0], [0, 1.0, 0], [0, 0.9, 0]])
    ap = average_precision(scores, labels)
    assert math.isnan(ap[2].item())
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)


# ------------------------------------------------------------------------- top-k, ECE


def test_top_k_accuracy_hand_computed():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    labels = torch.tensor([2, 0, 0, 1])
    # top-1 predictions 1, 0, 2, 2: one hit in four.
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(0.25)
    # top-2 sets {1,2}, {0,1}, {2,1}, {2, 0 or 1}: hits on rows 0 and 1, miss on row 2.
    assert top_k_accuracy(scores[:3], labels[:3], 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == pytest.approx(1.0)
    for bad in (0, 4, 1.5, True):
        with pytest.raises(OptionError):
            top_k_accuracy(scores, labels, bad)


def test_ece_hand_computed():
    # Two bins (0, 0.5], (0.5, 1]. Bin 2: confidences 0.9, 0.8, 0.6, correct 1, 1, 0:
    # |acc - conf| = |2 - 2.3| / 3 = 0.1, weight 3/4. Bin 1: confidence 0.4, correct:
    # |1 - 0.4| = 0.6, weight 1/4. ECE = 0.075 + 0.15 = 0.225.
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.4, 0.35, 0.25]])
    labels = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.225)


def test_ece_perfectly_calibrated_and_overconfident():
    # Confidence 1 and always right: ECE 0. Confidence 1 and always wrong: ECE 1.
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, torch.tensor([1, 0])) == pytest.approx(1.0)
    with pytest.raises(OptionError):
        expected_calibration_error(probs, torch.tensor([0, 1]), bins=0)
    with pytest.raises(ShapeError):
        expected_calibration_error(probs, torch.tensor([0]))


# -------------------------------------------------------------------------------- stats


def test_t_quantile_matches_tables():
    # Student-t 97.5 % quantiles from printed tables.
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)


def test_summarize_hand_computed():
    s = summarize([1.0, 2.0, 3.0, 6.0])
    # mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3.
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(math.sqrt(14 / 3))
    assert s["ci95"] == pytest.approx(3.182446 * math.sqrt(14 / 3) / 2, rel=1e-5)
    assert s["n"] == 4
    assert summarize([5.0]) == {"mean": 5.0, "std": 0.0, "ci95": None, "n": 1}
    assert summarize([])["mean"] is None


def test_paired_difference():
    # Differences 1, 1, 1: zero spread, no interval to judge by (the zero-width one called
    # every such difference real: two quick-run seeds each one test cloud apart, 18 %
    # against 16 %, were printed as "worse beyond the spread: -2.0 ± 0.0").
    d = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert d["mean"] == pytest.approx(1.0) and d["ci95"] == pytest.approx(0.0) and d["exceeds_spread"] is None
    d = paired_difference([2.0, 3.0, 4.5], [1.0, 2.0, 3.0])  # 1, 1, 1.5: spread, interval excludes 0
    assert d["exceeds_spread"] is True
    # Differences 1, -1, 0.5: mean 1/6, the interval contains 0.
    d = paired_difference([1.0, 0.0, 0.5], [0.0, 1.0, 0.0])
    assert d["exceeds_spread"] is False
    assert paired_difference([1.0], [0.0])["exceeds_spread"] is None
    with pytest.raises(ShapeError, match="paired by seed.*got 2 and 3"):
        paired_difference([1.0, 2.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_format_mean_std():
    assert format_mean_std({"mean": 0.8301, "std": 0.0123, "n": 3}) == "83.0 ± 1.2"
    assert format_mean_std({"mean": 0.8301, "std": 0.0, "n": 1}) == "83.0"
    assert format_mean_std({"mean": 2.5, "std": 0.25, "n": 2}, scale=1.0, digits=2) == "2.50 ± 0.25"
    assert format_mean_std({"mean": None, "std": None, "n": 0}) == "–"


# ------------------------------------------------------------------------------ running


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", 3, "gpu"):
        with pytest.raises(OptionError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA device"):
            resolve_device("cuda")


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [10**22, 0, 2.0, True])
def test_experiment_configs_bound_threads(threads):
    """Config(threads=10**22).validate() passed and the run ended in torch's own ValueError
    ("Overflow when unpacking long long"); the CLI bounded it, the Python API did not."""
    from convexddn.experiments.pointcloud.config import Config as PointCloud
    from convexddn.experiments.projection.config import Config as Projection

    for config in (PointCloud, Projection):
        with pytest.raises(OptionError, match=r"^threads must be a positive int \(at most 4096\) or None"):
            config(threads=threads).validate()
    PointCloud(threads=4096).validate()


def test_count_library_warnings_counts_ours_and_shows_others():
    with pytest.warns(UserWarning, match="not ours"):
        with CountLibraryWarnings() as counted:
            for _ in range(3):
                warnings.warn("slow", SolverWarning)
            warnings.warn("not ours", UserWarning)
    assert counted.counts == {"SolverWarning": 3}


def test_run_command_exit_status(capsys):
    def bad():
        raise OptionError("seeds must be a positive int, got 0")

    assert run_command("prog", bad, lambda cfg: 0) == 2
    assert capsys.readouterr().err == "prog: error: seeds must be a positive int, got 0\n"
    assert run_command("prog", lambda: 5, lambda cfg: cfg - 5) == 0
    # Failures after validation are not user mistakes: they keep their traceback.
    with pytest.raises(RuntimeError):
        run_command("prog", lambda: 1, lambda cfg: (_ for _ in ()).throw(RuntimeError("boom")))


def test_show_progress_only_on_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    assert show_progress(True) is True and show_progress(False) is False
    assert show_progress(None) is False  # pytest captures stderr: not a terminal
    monkeypatch.setattr("sys.stderr", Terminal())
    assert show_progress(None) is True


# --------------------------------------------------------------------------- audit fixes


def test_metrics_refuse_non_finite_scores_and_foreign_labels():
    from convexddn.errors import DTypeError, NonFiniteError
    from convexddn.experiments.metrics import expected_calibration_error, mean_average_precision, top_k_accuracy

    # NaN scores (a diverged model) raised a raw "index -1 is out of bounds".
    with pytest.raises(NonFiniteError, match="scores"):
        mean_average_precision(torch.tensor([[math.nan, 1.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    # Label 7 of 3 classes was dropped as an absent class: mAP 1.0, accuracy 2/3.
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    for labels in (torch.tensor([0, 1, 7]), torch.tensor([0, 1, -1])):
        for metric in (mean_average_precision, top_k_accuracy, expected_calibration_error):
            with pytest.raises(OptionError, match=r"labels must lie in \[0, 3\)"):
                metric(scores.softmax(1) if metric is expected_calibration_error else scores, labels)
    with pytest.raises(DTypeError, match="labels must be integers"):
        top_k_accuracy(scores, torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_stats_refuse_non_finite_values(bad):
    from convexddn.errors import NonFiniteError

    # A NaN seed made paired_difference's exceeds_spread False ("within the spread" in the
    # reports) and summarize's mean NaN, without a warning.
    with pytest.raises(NonFiniteError, match=r"a\[1\] must be finite"):
        paired_difference([0.9, bad, 0.8], [0.1, 0.1, 0.1])
    with pytest.raises(NonFiniteError, match=r"b\[0\] must be finite"):
        paired_difference([0.9, 0.5, 0.8], [bad, 0.1, 0.1])
    with pytest.raises(NonFiniteError, match=r"values\[2\] must be finite"):
        summarize([0.5, 0.6, bad])


def test_stats_refuse_values_that_are_not_real_numbers():
    from convexddn.errors import DTypeError

    for bad in ("0.5", 1 + 2j, True, None):
        with pytest.raises(DTypeError, match=r"values\[1\] must be a real number"):
            summarize([0.5, bad])
    assert summarize([1, 3])["mean"] == 2.0  # ints are real numbers


@pytest.mark.parametrize("metric", [average_precision, mean_average_precision, top_k_accuracy,
                                    expected_calibration_error])
def test_metrics_refuse_empty_bool_and_complex_scores(metric):
    from convexddn.errors import DTypeError

    labels = torch.tensor([0, 1, 1, 0])
    # No sample gave NaN for every metric; complex scores were ranked by their real part;
    # bool ones raised torch's RuntimeError from topk.
    with pytest.raises(ShapeError, match="at least one row"):
        metric(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ShapeError, match="at least one row"):
        metric(torch.zeros(4, 0), labels)
    for scores in (torch.tensor([[True, False]] * 4), torch.full((4, 2), 0.5, dtype=torch.cfloat)):
        with pytest.raises(DTypeError, match=f"must be real .*got {scores.dtype}"):
            metric(scores, labels)


def test_ece_refuses_rows_that_are_not_probability_vectors():
    from convexddn.errors import InputError

    torch.manual_seed(0)
    logits = 3 * torch.randn(200, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (200,))
    # Logits passed as probabilities gave ECE 4.54 (documented "in [0, 1]").
    with pytest.raises(InputError, match="probs must hold probability vectors"):
        expected_calibration_error(logits, labels)
    # Rows summing to 1 with entries outside [0, 1].
    with pytest.raises(InputError, match="row 0: entries from -0.5 to 1.5, sum 1"):
        expected_calibration_error(torch.tensor([[1.5, -0.5]] * 4), torch.zeros(4, dtype=torch.long))
    # A half-precision softmax passes (its rows sum to 1 only to a few ulp), and the value
    # is that of the float64 probabilities up to that rounding.
    for dtype in (torch.float16, torch.bfloat16):
        probs = logits.to(dtype).softmax(dim=1)
        ece = expected_calibration_error(probs, labels)
        assert 0.0 <= ece <= 1.0
    # One-hot integer rows are probability vectors: confidence 1 and always right, ECE 0.
    assert expected_calibration_error(torch.eye(3, dtype=torch.long), torch.arange(3)) == 0.0
