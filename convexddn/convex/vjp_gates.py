"""The gates of the batched backward (:mod:`.vjp`): how accurately its derivative system is solved and
accepted, and the amplifications beyond which a derivative is tested for existing or certified densely.
Each constant says what it was measured on."""
from __future__ import annotations

import torch

__all__ = ["AMPLIFICATION", "BACKWARD_ACCEPT", "BACKWARD_RTOL", "CERTIFIED_ERROR", "GRADIENT_ACCURACY", "LIMIT_GATE",
           "LOOSE", "PROBE_GAIN", "PROBE_GATE", "backward_accept"]

# Relative residual the backward's KKT solve is refined to beyond its fixed steps
# (KKTSystem.solve's ``until``): an MPC's gradient 7e-7 off finite differences (4e-3 after
# 3 steps); the n = 50 QP's backward at batch 1024 106-123 -> 127-166 ms (1e-11: 220-252).
BACKWARD_RTOL = 1e-9
# ... and the residual above which the factorised solve has failed: refinement stalls where
# the limit system is too ill-conditioned for its reduced form (CVXPY's chain of 40
# second-order cones for p^1.005 stopped at 0.46, and the gradient came back 0.4 off
# without a warning). Those elements are solved densely (:mod:`.dense_kkt`); where that
# fails too, their gradient is zeroed and warned about. (An MPC's ill-conditioned solves
# reach 2e-8.) Between LOOSE and it the factorised answer is kept where a dense solve certifies it (vjp._loose).
BACKWARD_ACCEPT = 1e-6
# The residual above which a kept factorised answer is certified densely: every refinement that stopped short of
# its target. Up to 2026-12-07 a refinement ending within 10x of it was kept (certifying those cost +17 % on the
# n = 50 QP at batch 64 then, where none reaches it now); but there the error is not within the residual:
# argmin u^4 - q u at u* = 6.3e-3 ended near 2e-9 with a gradient 5e-8 off, a QP (n = 24) at 9.6e-9 1.3e-8 off,
# silently. Now: qp50 batch 64 and sparsemax at 1024 none, the OptNet QP at batch 128 7 of 128 (its backward
# 80 -> 93 ms), those two 2e-12 and 5e-14 off. u³ at u* = 1e3 stopped at 5e-7, u^1.25 at 1e3 at 3.8e-7. (Below
# it the residual need not bound the error either: u^4 at u* = 10 was 4e-7 off at a residual of 4e-10; there the
# refinement's own error estimate, stall.refinement_error, above GRADIENT_ACCURACY brings a dense solve's answer
# where that one is certified below it: vjp._confirm.)
LOOSE = BACKWARD_RTOL
# Amplification of the derivative system above which the gradient is reported as not
# existing (between ~10 for unique solutions and ~1e9 for non-unique ones; 1/√eps ≈ 7e7),
# unless the limit system's test finds the solution unique (float64) and a dense solve's
# estimated error is below CERTIFIED_ERROR (see _certify) ...
AMPLIFICATION = 1e7
# ... (the gradients' promised accuracy)
CERTIFIED_ERROR = 1e-4
# The relative accuracy float64 gradients promise; a certified answer estimated less accurate is kept,
# with a GradientWarning giving the estimate: float64's floor there (u^1.005 at u* = 2e6, K's componentwise
# condition 6.7e10: one-ulp changes of K's entries move it by 1-2e-6; 7.3e-7 off, estimated 3.5e-6).
GRADIENT_ACCURACY = 1e-8
# ... and above which the limit system's uniqueness test runs: non-unique solutions reach
# at least ~lift/(eps·max z) (2.5e3 measured) even where rounding caps them; unique ones
# stay near 1 (at most 4 on the OptNet QPs).
LIMIT_GATE = 10.0
# The same for the probe along a parameter direction: measured in a gradient fuzz, at most
# 1.7e2 on 659 elements where central differences agree with the gradient to 1e-6, at
# least 2.3e7 on the 20 where they disagree by more than 1e-4, 7.9e6 on one more. Used with
# second-order cones only: on LPs and QPs the limit tests decide (rows 1e-5 apart gain 1e10
# with a derivative, as 1/d², which the gain cannot tell from a degenerate vertex's 1/δ).
PROBE_GAIN = 1e6
# ... and above which the limit system's test runs on the probe's right-hand side:
# rounding capped the probe's blow-up at 85 on min ‖x‖₁ s.t. aᵀx = b at a = (1, 1, 1),
# whose face of optima the parameters tilt; on the bench's QPs and sparsemax no element
# passes (no cost there), on the MPC at batch 8 all do.
PROBE_GATE = 10.0


def backward_accept(like: torch.Tensor) -> float:
    """:data:`BACKWARD_ACCEPT`, or in a low precision 1e4 ε (float32 solves stop at ~1e-5,
    where its gradients are ~1e-3 accurate)."""
    return max(BACKWARD_ACCEPT, 1e4 * torch.finfo(like.dtype).eps)
