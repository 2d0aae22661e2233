"""Tests of convexddn.nodes._repr: how node modules show options that may be tensors."""
from __future__ import annotations

import pytest
import torch

from convexddn.nodes._repr import format_option


@pytest.mark.parametrize("value, shown", [
    (torch.tensor(2.0), "2.0"),
    (torch.tensor(0.1, dtype=torch.float32), "0.1"),  # not 0.10000000149011612
    (torch.tensor(1e-20, dtype=torch.float64), "1e-20"),
    (torch.tensor(float("inf")), "inf"),
    (torch.tensor(3), "3"),
    (torch.tensor(2.0, requires_grad=True), "2.0"),
    (torch.nn.Parameter(torch.tensor(0.5)), "Parameter(0.5)"),
    (torch.tensor([2.0]), "tensor([2.0])"),
    (torch.tensor([[2.0]]), "tensor([[2.0]])"),
    (torch.nn.Parameter(torch.tensor([2.0])), "Parameter([2.0])"),
    (torch.ones(3), "tensor of shape (3,)"),
    (torch.ones(0), "tensor of shape (0,)"),
    (torch.nn.Parameter(torch.ones(2, 3)), "Parameter of shape (2, 3)"),
    (torch.tensor(2.0, device="meta"), "tensor of shape ()"),  # no value to read
    (1.5, "1.5"),
    (None, "None"),
])
def test_format_option(value, shown):
    assert format_option(value) == shown
