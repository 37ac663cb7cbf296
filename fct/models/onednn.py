"""oneDNN kernels for the folded h on CPU: the availability probe, the kernel plan and its run.

A plan is a list of (packed weight, bias, activation) layers per chain, one
``torch.ops.mkldnn._linear_pointwise`` call each (GEMM + bias + ReLU fused), with the weights
reordered once into oneDNN's blocked layout. ``FoldedTransformation`` (fct.models.
transformation) builds a plan from its folded buffers, caches it, and runs it here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch

Layer = tuple[torch.Tensor, torch.Tensor, str]
Plan = dict[str, list[Layer]]

# See FoldedTransformation.block_diagonal: measured on a Zen 5 CPU, fusing won by 1-3 % at
# 3.4 % waste and lost by 3-10 % at 18 %.
BLOCK_DIAGONAL_MAX_WASTE = 0.05


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's fused linear (GEMM + bias + ReLU) runs in this torch build and CPU.

    The op (``torch.ops.mkldnn._linear_pointwise``, what Inductor emits for frozen CPU
    linears) is private to torch, so it is probed once on a tiny input instead of assumed.
    bfloat16 also needs a CPU with oneDNN's bfloat16 kernels (AVX-512 or AMX).
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        if dtype not in (torch.float32, torch.bfloat16):
            return False
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        y = torch.ops.mkldnn._linear_pointwise(
            torch.ones(1, 2), weight, torch.full((2,), -3.0), "relu", [], ""
        )
        ok = torch.equal(y, torch.zeros(1, 2))
        y = torch.ops.mkldnn._linear_pointwise(
            torch.ones(1, 2), weight, torch.ones(2), "none", [], ""
        )
        return ok and torch.equal(y, torch.full((1, 2), 3.0))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def block_diagonal_pays(d_old: int, d_new: int, d_side: int, macs: int) -> bool:
    """Whether fusing h's two branches into block-diagonal GEMMs wastes at most
    ``BLOCK_DIAGONAL_MAX_WASTE`` of h's ``macs`` multiply-adds on zero blocks."""
    d_side_in = d_side or d_old
    stacked_first = d_side == 0  # both branches read old: stacked, nothing wasted
    waste = 2 * d_new * 2 * d_side_in + 2 * d_new * 2 * d_old
    if not stacked_first:
        waste += 2 * d_old * d_side_in + 2 * d_side_in * d_old
    return waste <= BLOCK_DIAGONAL_MAX_WASTE * macs


def plan_key(buffers: Iterable[torch.Tensor]) -> tuple:
    """What a plan depends on: identity, version, dtype and device of every buffer.

    A plan built under another key serves stale weights (an in-place update, ``.to()``).
    """
    # Inference tensors (made under inference_mode) have no version counter.
    return tuple(
        (b.data_ptr(), -1 if b.is_inference() else b._version, b.dtype, b.device) for b in buffers
    )


def build_plan(
    w: Mapping[str, torch.Tensor], d_side: int, block_diagonal: bool, batch: int
) -> Plan:
    """(packed weight, bias, activation) per oneDNN layer of a folded h.

    ``w`` maps FoldedTransformation's buffer names to its folded tensors. The plan has
    ``fused``: the whole h as one chain (branches block-diagonal); or ``old``, ``side`` (the
    two branch chains; ``first`` is the stacked first layer when d_side=0) and ``mixer``.
    """

    def pack(wt: torch.Tensor, b: torch.Tensor, act: str = "relu") -> Layer:
        # The batch size is a layout hint only: the packed weights serve any batch.
        reorder = torch.ops.mkldnn._reorder_linear_weight
        return reorder(wt.contiguous(), max(batch, 1)), b.contiguous(), act

    mixer = [
        pack(w["mix1_w"], w["mix1_b"]),
        pack(w["mix2_w"], w["mix2_b"]),
        pack(w["out_w"], w["out_b"], "none"),
    ]
    old2, side2 = (w["old2_w"], w["old2_b"]), (w["side2_w"], w["side2_b"])
    second = pack(torch.block_diag(old2[0], side2[0]), torch.cat([old2[1], side2[1]]))
    plan: Plan
    if d_side == 0:
        first = pack(w["in_w"], w["in_b"])
        plan = (
            {"fused": [first, second, *mixer]}
            if block_diagonal
            else {"first": [first], "old": [pack(*old2)], "side": [pack(*side2)]}
        )
    elif block_diagonal:
        weight = torch.block_diag(w["old1_w"], w["side1_w"])
        first = pack(weight, torch.cat([w["old1_b"], w["side1_b"]]))
        plan = {"fused": [first, second, *mixer]}
    else:
        plan = {
            "old": [pack(w["old1_w"], w["old1_b"]), pack(*old2)],
            "side": [pack(w["side1_w"], w["side1_b"]), pack(*side2)],
        }
    plan.setdefault("mixer", mixer)
    return plan


def _chain(x: torch.Tensor, layers: list[Layer]) -> torch.Tensor:
    for weight, bias, act in layers:
        x = torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "")
    return x


def run_plan(plan: Plan, old: torch.Tensor, side: torch.Tensor | None, d_old: int) -> torch.Tensor:
    """h's output from a plan (``side`` None: the branches share ``old``, width ``d_old``)."""
    if "fused" in plan:
        # One small [N, d_old + d_side] copy of the inputs; the branch outputs then come
        # out of the block-diagonal GEMMs already concatenated, as the mixer wants them.
        return _chain(old if side is None else torch.cat([old, side], dim=1), plan["fused"])
    if side is None:
        first = _chain(old, plan["first"])
        split = 2 * d_old
        old_in, side_in = first[:, :split], first[:, split:]
        h_old, h_side = _chain(old_in, plan["old"]), _chain(side_in, plan["side"])
    else:
        h_old, h_side = _chain(old, plan["old"]), _chain(side, plan["side"])
    return _chain(torch.cat([h_old, h_side], dim=1), plan["mixer"])
