"""The measured GEMM peak: plain GEMM sequences with h's exact layer shapes, timed with
each GEMM library torch offers on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fct.errors import FCTError
from fct.models import onednn_linear_available


def layer_shapes(d_old: int, d_new: int, d_side: int = 0, hidden: int = 2048) -> list[tuple]:
    """(d_in, d_out) of each of h's linear layers, in the order h runs them.

    Without side-information the two branches' first layers are listed as the one stacked
    GEMM the folded module runs (same FLOPs).
    """
    s = d_side or d_old
    first = [(d_old, 2 * d_old + 2 * s)] if d_side == 0 else [(d_old, 2 * d_old), (s, 2 * s)]
    return [
        *first,
        (2 * d_old, 2 * d_new),
        (2 * s, 2 * d_new),
        (4 * d_new, hidden),
        (hidden, hidden),
        (hidden, d_new),
    ]


def gemm_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """GEMM libraries to time on ``device``: ``torch.mm`` always, oneDNN on CPU if present."""
    names = ["torch.mm"]
    if device.type == "cpu" and onednn_linear_available(dtype):
        names.append("onednn")
    return names


def gemm_sequence(
    shapes: Sequence[tuple[int, int]],
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
) -> Callable[[], None]:
    """A function running one plain GEMM (no bias, no activation) per shape.

    Inputs, weights and (for ``torch.mm``) outputs are allocated once, so the calls time the
    GEMMs themselves. oneDNN's weights are reordered once into its blocked layout, as a
    deployed model would hold them.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    xs = [rand(batch, d_in) for d_in, _ in shapes]
    ws = [rand(d_out, d_in) for d_in, d_out in shapes]
    if backend == "torch.mm":
        outs = [torch.empty(batch, d_out, device=device, dtype=dtype) for _, d_out in shapes]

        def run() -> None:
            for x, w, out in zip(xs, ws, outs):
                torch.mm(x, w.t(), out=out)

        return run
    if backend == "onednn":
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, max(batch, 1)) for w in ws]
        linear = torch.ops.mkldnn._linear_pointwise

        def run() -> None:
            for x, w in zip(xs, packed):
                linear(x, w, None, "none", [], "")

        return run
    raise FCTError(f"unknown GEMM backend {backend!r}; use torch.mm or onednn")
