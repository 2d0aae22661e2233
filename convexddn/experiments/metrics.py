"""Classification metrics shared by the experiments: top-k accuracy, mAP and calibration.

Every function takes a score matrix ``(M, C)`` (logits or probabilities: one row per
sample, one column per class) and integer labels ``(M,)``, works on any device without
leaving torch, and returns plain floats (or a ``(C,)`` tensor for per-class AP).
"""
from __future__ import annotations

import torch

from .._checks import check_finite
from ..errors import DTypeError, InputError, OptionError, ShapeError

__all__ = [
    "average_precision",
    "mean_average_precision",
    "top_k_accuracy",
    "expected_calibration_error",
]


def _check_scores(scores: torch.Tensor, labels: torch.Tensor, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DTypeError(f"{name} and labels must be torch.Tensors, got {type(scores).__name__} and "
                         f"{type(labels).__name__}")
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ShapeError(
            f"{name} must be (M, C) and labels (M,), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    # No sample (or no class) gave NaN for every metric, silently.
    if scores.numel() == 0:
        raise ShapeError(f"{name} must have at least one row (sample) and one column (class), "
                         f"got shape {tuple(scores.shape)}")
    # Complex scores were ranked by their real part (a warning at most); bool ones broke
    # topk with a raw RuntimeError.
    if scores.is_complex() or scores.dtype == torch.bool:
        raise DTypeError(f"{name} must be real (floating-point or integer), got {scores.dtype}")
    # A diverged model's NaN scores broke the ranking with a raw index error; a label
    # outside [0, C) was dropped as an absent class (mAP 1.0 for a wrong answer).
    check_finite(name, scores.detach())
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DTypeError(f"labels must be integers, got {labels.dtype}")
    if not bool(((labels >= 0) & (labels < scores.shape[1])).all()):
        raise OptionError(f"labels must lie in [0, {scores.shape[1]}) (the columns of {name}), got "
                          f"values from {int(labels.min())} to {int(labels.max())}")


def _check_probabilities(probs: torch.Tensor) -> None:
    """``InputError`` unless every row of ``probs`` is a probability vector: entries in
    [0, 1] and a sum of 1, up to rounding (1e-4, or 4 ulp of a half-precision dtype)."""
    eps = torch.finfo(probs.dtype).eps if probs.is_floating_point() else 0.0
    tol = max(1e-4, 4 * eps)
    p = probs.detach().to(torch.float64)
    total = p.sum(dim=1)
    bad = (p < -tol).any(dim=1) | (p > 1 + tol).any(dim=1) | ((total - 1).abs() > tol)
    if bool(bad.any()):
        # Logits were taken as confidences: ECE 4.54 for 10-class logits, "in [0, 1]".
        i = int(bad.nonzero()[0, 0])
        raise InputError(
            f"probs must hold probability vectors (entries in [0, 1], each row summing to 1, e.g. "
            f"scores.softmax(dim=1)), got {int(bad.sum())} row(s) that are not, e.g. row {i}: entries from "
            f"{float(p[i].min()):.4g} to {float(p[i].max()):.4g}, sum {float(total[i]):.6g}")


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-vs-rest average precision per class.

    For class ``c``, samples are ranked by ``scores[:, c]`` (descending) and

    .. math::

        AP_c = \\frac{1}{P_c} \\sum_{i:\\, y_i = c} \\operatorname{precision}(s_{ic}),

    the precision of the set ``{j : s_jc ≥ s_ic}``; tied scores thus share one
    threshold (the same definition as scikit-learn's ``average_precision_score``).
    The ranking is per class across samples, so it depends on whether ``scores`` are
    logits or softmax probabilities (the softmax rescales each row differently).

    Shape: scores ``(M, C)``, labels ``(M,)`` int in ``[0, C)`` -> ``(C,)`` float64;
    ``NaN`` for a class with no positive sample.

    Raises:
        ShapeError: if ``scores`` is not 2-D with at least one row and column, or
            ``labels`` does not match its rows.
        NonFiniteError: NaN or Inf scores. DTypeError: bool or complex scores, labels
            that are not integers.
        OptionError: labels outside ``[0, C)``.
    """
    _check_scores(scores, labels)
    m, c = scores.shape
    s = scores.detach().to(torch.float64).T  # (C, M)
    positive = labels.to(scores.device)[None, :] == torch.arange(c, device=scores.device)[:, None]
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

    Raises:
        as :func:`average_precision`.
    """
    ap = average_precision(scores, labels)
    present = ~torch.isnan(ap)
    return float(ap[present].mean())


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest scores of its row.

    Ties at the k-th score are broken by ``torch.topk`` (not counted as hits twice).

    Shape: scores ``(M, C)``, labels ``(M,)`` -> a float in ``[0, 1]``.

    Raises:
        ShapeError, NonFiniteError, DTypeError: as :func:`average_precision`.
        OptionError: if ``k`` is not an int in ``[1, C]``, or as :func:`average_precision`.
    """
    _check_scores(scores, labels)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise OptionError(f"k must be an int in [1, {scores.shape[1]}], got {k!r}")
    top = scores.detach().topk(k, dim=1).indices
    return float((top == labels.to(scores.device)[:, None]).any(dim=1).double().mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (Guo et al., ICML 2017).

    Samples are grouped by confidence :math:`\\hat p_i = \\max_c p_{ic}` into ``bins``
    equal-width bins :math:`B_b = (b/n, (b+1)/n]` and

    .. math::

        \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{M} \\,
        \\Bigl| \\operatorname{acc}(B_b) - \\operatorname{conf}(B_b) \\Bigr|,

    the gap between accuracy and mean confidence, weighted by bin size.

    Shape: probs ``(M, C)`` (rows are probability vectors, e.g. a softmax), labels
    ``(M,)`` -> a float in ``[0, 1]``.

    Raises:
        ShapeError, NonFiniteError, DTypeError: as :func:`average_precision`.
        InputError: if a row of ``probs`` is not a probability vector (entries in
            ``[0, 1]`` summing to 1, up to rounding): logits, for instance.
        OptionError: if ``bins`` is not a positive int, or as :func:`average_precision`.
    """
    _check_scores(probs, labels, "probs")
    _check_probabilities(probs)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise OptionError(f"bins must be a positive int, got {bins!r}")
    conf, pred = probs.detach().to(torch.float64).max(dim=1)
    correct = (pred == labels.to(probs.device)).to(torch.float64)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    # sum_b |B_b|/M * |acc_b - conf_b| = sum_b |sum_{i in B_b} (correct_i - conf_i)| / M.
    gap = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, index, correct - conf)
    return float(gap.abs().sum() / len(conf))
