"""The images of the projection experiment: scikit-learn's bundled 8×8 handwritten digits.

1797 grey-scale images of the digits 0–9 (about 180 per class), pixel values 0–16,
shipped inside scikit-learn (``sklearn.datasets.load_digits``): nothing is downloaded.
Each seed draws its own stratified train/test split; pixels are scaled to [0, 1] and
standardised with the training split's mean and standard deviation.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from ...errors import OptionError

__all__ = ["NUM_CLASSES", "require_sklearn", "load_digits", "split_digits"]

NUM_CLASSES = 10

_MISSING = ("the projection experiment reads scikit-learn's bundled digits images; "
            "install it with: pip install scikit-learn")


def require_sklearn() -> None:
    """Raise ``ImportError`` with the install command when scikit-learn is missing."""
    if importlib.util.find_spec("sklearn") is None:
        raise ImportError(_MISSING)


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images ``(M, 1, 8, 8)`` float32 in [0, 1] and labels ``(M,)`` int64.

    Raises:
        ImportError: if scikit-learn is not installed.
    """
    require_sklearn()
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def split_digits(train_fraction: float, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stratified split drawn from ``seed``, standardised with the training statistics.

    ``round(train_fraction * n_c)`` images of each class ``c`` go to training (at least
    one, and at least one left for testing); both splits are shuffled.

    Returns:
        ``(train_x, train_y, test_x, test_y)``: images ``(M, 1, 8, 8)``, labels ``(M,)``.

    Raises:
        OptionError: if ``train_fraction`` is outside ``(0, 1)``.
        ImportError: if scikit-learn is not installed.
    """
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
            or not 0.0 < train_fraction < 1.0:
        raise OptionError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    images, labels = load_digits()
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        k = min(max(1, round(train_fraction * len(members))), len(members) - 1)
        train_idx.append(members[:k])
        test_idx.append(members[k:])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx)
    # Shuffle so that a batch taken in order mixes the classes.
    train = train[torch.randperm(len(train), generator=g)]
    test = test[torch.randperm(len(test), generator=g)]
    mean = images[train].mean()
    std = images[train].std()
    return (images[train] - mean) / std, labels[train], (images[test] - mean) / std, labels[test]
