"""What several kernels share: the base-2 softmax constant and the visibility rule in Triton.

The kernels are a leaf package: they take plain numbers (dilation D, window W, sinks P, block
sizes) and tensors, never project objects; the project's ``backend`` module does the routing.
The rule is the one written in docs/DESIGN.md §2; the ``patterns`` package holds its
PyTorch twin.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels' softmax runs in base 2


@triton.jit
def visible_rule(tt, jj, D, W, P):
    """May a query at position ``tt`` attend the key at ``jj``? (broadcast tensors; D = T + 1 for no dilation)."""
    return (jj <= tt) & (((jj + 1) % D == 0) | (tt - jj <= W) | (jj < P))
