"""FCT's transformation h and its inference form.

- ``Transformation``: FCT's h, old embedding (+ side-information) -> new embedding, with the
  reference code's widths, so parameter counts match it.
- ``FoldedTransformation`` / ``fold_batchnorm``: h for inference with BatchNorm folded into
  the linear layers and fused GEMM + bias + ReLU kernels (docs/throughput.md); its oneDNN
  kernel plan lives in fct.models.onednn.
- ``transformation_flops``: h's FLOPs per item, for throughput reports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fct.errors import FCTError
from fct.models import onednn
from fct.models.checks import positive_int


def _block(d_in: int, d_out: int) -> nn.Sequential:
    # Bias-free linear: the BatchNorm after it has its own shift (the reference's ConvBlock
    # has a conv bias only when there is no normaliser).
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU())


def _check_dims(d_old: int, d_new: int, d_side: int, hidden: int) -> None:
    positive_int("d_old", d_old)
    positive_int("d_new", d_new)
    positive_int("hidden", hidden)
    if isinstance(d_side, bool) or not isinstance(d_side, int) or d_side < 0:
        raise FCTError(f"d_side must be an integer >= 0 (0: no side-information), got {d_side!r}")


def _check_input(name: str, x: torch.Tensor | None, dim: int) -> None:
    if x is None or x.ndim != 2 or x.shape[1] != dim:
        shape = None if x is None else tuple(x.shape)
        raise FCTError(f"transformation expects {name} of shape [N, {dim}], got {shape}")


def _side_input(
    old: torch.Tensor, side: torch.Tensor | None, d_old: int, d_side: int
) -> torch.Tensor:
    """Check inputs and return what feeds the side branch (``old`` itself when d_side == 0)."""
    _check_input("old embeddings", old, d_old)
    if d_side == 0:
        if side is not None:
            raise FCTError(
                "this transformation was built without side-information (d_side=0); "
                "pass side=None or build it with d_side"
            )
        return old
    _check_input("side-information", side, d_side)
    return side


class Transformation(nn.Module):
    """FCT's transformation h: (old embedding, side-information) -> new embedding.

    Same layers as the reference (apple/ml-fct ``MLP_BN_SIDE_PROJECTION``, 1x1 convs written
    as Linear on ``[N, C]``): each block is Linear (no bias) + BatchNorm + ReLU.

    - old branch: d_old -> 2 d_old -> 2 d_new
    - side branch: d_side -> 2 d_side -> 2 d_new; with ``d_side=0`` the old embedding feeds
      this branch too (input width d_old), as the reference does without side-information
    - mixer on the concatenation (4 d_new): -> hidden -> hidden, then Linear (with bias)
      hidden -> d_new; no residuals, no output normalisation.

    At 128/128/128 with hidden 2048 this has 5,712,000 parameters (reference: ~5.71 M).
    """

    def __init__(self, d_old: int, d_new: int, d_side: int = 0, hidden: int = 2048) -> None:
        super().__init__()
        _check_dims(d_old, d_new, d_side, hidden)
        self.d_old, self.d_new, self.d_side, self.hidden = d_old, d_new, d_side, hidden
        d_side_in = d_side or d_old
        self.old_branch = nn.Sequential(_block(d_old, 2 * d_old), _block(2 * d_old, 2 * d_new))
        self.side_branch = nn.Sequential(
            _block(d_side_in, 2 * d_side_in), _block(2 * d_side_in, 2 * d_new)
        )
        self.mixer = nn.Sequential(
            _block(4 * d_new, hidden), _block(hidden, hidden), nn.Linear(hidden, d_new)
        )
        self.bn_frozen = False

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """New-model-compatible embeddings ``[N, d_new]`` from old ``[N, d_old]`` (+ side)."""
        side = _side_input(old, side, self.d_old, self.d_side)
        return self.mixer(torch.cat([self.old_branch(old), self.side_branch(side)], dim=1))

    def freeze_bn(self, frozen: bool = True) -> Transformation:
        """Freeze (or unfreeze) BatchNorm running statistics; returns self.

        The reference trains h in eval mode for the second half of training. Here the BN
        layers stay in eval mode through later ``train()`` calls until ``freeze_bn(False)``,
        so a trainer that calls ``h.train()`` every epoch keeps them frozen. BN's affine
        parameters still train, as in the reference.
        """
        self.bn_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> Transformation:
        """As nn.Module.train, but BatchNorm stays in eval mode while ``bn_frozen``."""
        super().train(mode)
        if getattr(self, "bn_frozen", False):
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()
        return self

    def folded(self) -> FoldedTransformation:
        """A new inference module with BatchNorm folded in (see ``fold_batchnorm``)."""
        return FoldedTransformation(self)


@torch.no_grad()
def _fold(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64 of a Linear [+ eval-mode BatchNorm] block, BN folded in.

    BN(Wx + b) = s * (Wx + b - mean) + beta with s = gamma / sqrt(var + eps), so
    W' = s[:, None] * W and b' = s * (b - mean) + beta. Float64 keeps the folded layers
    within rounding of the original.
    """
    linear = block[0] if isinstance(block, nn.Sequential) else block
    weight = linear.weight.detach().double()
    bias = (
        linear.bias.detach().double()
        if linear.bias is not None
        else weight.new_zeros(weight.shape[0])
    )
    bn = block[1] if isinstance(block, nn.Sequential) and len(block) > 1 else None
    if not isinstance(bn, nn.BatchNorm1d):
        return weight, bias
    if bn.running_mean is None or bn.running_var is None:
        raise FCTError("cannot fold a BatchNorm without running statistics")
    gamma = bn.weight.detach().double() if bn.weight is not None else 1.0
    beta = bn.bias.detach().double() if bn.bias is not None else 0.0
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    return weight * scale[:, None], (bias - bn.running_mean.double()) * scale + beta


BACKENDS = ("auto", "onednn", "addmm")


class FoldedTransformation(nn.Module):
    """Inference-only h with BatchNorm folded into the linear layers, built for speed.

    Output equals ``h.eval()(old, side)`` up to float rounding. Built from a Transformation
    (which is left untouched). What makes it faster than ``h.eval()``:

    - every BatchNorm is folded into the Linear before it (four fewer elementwise passes
      over ``[N, hidden]``-sized activations);
    - without side-information both branches read the old embedding, so their first layers
      are stacked into one GEMM (``d_old -> 4 d_old``, no wasted zero blocks);
    - on CPU (float32, bfloat16) each layer is one oneDNN call with bias and ReLU fused into
      the GEMM, on weights reordered once into oneDNN's blocked layout and reused across
      calls. This is the main win where torch's own GEMM (MKL) is slow: on AMD Zen CPUs MKL's
      sgemm reaches about half of what oneDNN's AVX-512 kernels do (docs/throughput.md).
      Where it costs few wasted multiply-adds (``block_diagonal``: 3.4 % at 128/128/128)
      the two branches run as one GEMM per layer with block-diagonal weights: no
      concatenation copy and bigger GEMMs, which measured faster than the exact branches;
    - elsewhere (CUDA, other dtypes, ``backend="addmm"``) each layer is one ``addmm`` with
      ReLU in place, and the branches' second layers write straight into the two halves of
      one ``[N, 4 d_new]`` buffer, so the mixer's input needs no concatenation copy.

    ``backend``: "auto" (oneDNN where it applies, else addmm), "onednn" (refuse to run
    elsewhere) or "addmm". Under ``torch.compile`` the addmm graph is traced, so Inductor
    does its own lowering; inputs that require grad take a differentiable (slower) path.

    Weights are buffers (no gradients): the module is for encoding galleries, not training.
    ``state_dict`` holds the folded dense weights; ``.to(device, dtype)`` moves them (the
    oneDNN copies are rebuilt on the next call).
    """

    def __init__(self, h: Transformation, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise FCTError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "onednn" and not onednn.onednn_linear_available():
            raise FCTError(
                "backend='onednn' needs a torch build with oneDNN (mkldnn) on CPU; "
                "use backend='auto' or 'addmm'"
            )
        self.backend = backend
        dtype = next(h.parameters()).dtype
        self.d_old, self.d_new, self.d_side, self.hidden = h.d_old, h.d_new, h.d_side, h.hidden
        old1, old2 = (_fold(b) for b in h.old_branch)
        side1, side2 = (_fold(b) for b in h.side_branch)
        if self.d_side == 0:
            # Shared input: rows [0, 2 d_old) are the old branch, the rest the side branch.
            self._buffer("in_w", torch.cat([old1[0], side1[0]]), dtype)
            self._buffer("in_b", torch.cat([old1[1], side1[1]]), dtype)
        else:
            self._buffer("old1_w", old1[0], dtype)
            self._buffer("old1_b", old1[1], dtype)
            self._buffer("side1_w", side1[0], dtype)
            self._buffer("side1_b", side1[1], dtype)
        for name, (w, b) in {
            "old2": old2,
            "side2": side2,
            "mix1": _fold(h.mixer[0]),
            "mix2": _fold(h.mixer[1]),
            "out": _fold(h.mixer[2]),
        }.items():
            self._buffer(f"{name}_w", w, dtype)
            self._buffer(f"{name}_b", b, dtype)
        self._packed: tuple[tuple, onednn.Plan] | None = None

    def _buffer(self, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
        self.register_buffer(name, value.to(dtype).contiguous())

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's opaque tensors cannot be pickled or deep-copied; they are a cache.
        state = super().__getstate__()
        return {**state, "_packed": None}

    def path_for(self, old: torch.Tensor) -> str:
        """The kernel path ("onednn" or "addmm") a call on ``old`` takes."""
        if self.backend == "addmm" or old.device.type != "cpu":
            return "addmm"
        weight = self.mix2_w
        if (
            old.dtype == weight.dtype
            and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling()
            and onednn.onednn_linear_available(weight.dtype)
        ):
            return "onednn"
        return "addmm"

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """New-model-compatible embeddings ``[N, d_new]`` from old ``[N, d_old]`` (+ side)."""
        side_in = _side_input(old, side, self.d_old, self.d_side)
        differentiable = torch.is_grad_enabled() and (old.requires_grad or side_in.requires_grad)
        path = self.path_for(old)
        if self.backend == "onednn" and path != "onednn":
            raise FCTError(
                f"backend='onednn' runs on CPU float32/bfloat16 inputs matching the weights' "
                f"dtype ({self.mix2_w.dtype}), got {old.dtype} on {old.device}; use backend='auto'"
            )
        if path == "onednn" and not differentiable:
            return self._forward_onednn(old, side if self.d_side else None)
        return self._forward_addmm(old, side if self.d_side else None, differentiable)

    def _first_layers(
        self, old: torch.Tensor, side: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.d_side == 0:
            h1 = torch.addmm(self.in_b, old, self.in_w.t()).relu_()
            split = 2 * self.d_old
            return h1[:, :split], h1[:, split:]
        h_old = torch.addmm(self.old1_b, old, self.old1_w.t()).relu_()
        h_side = torch.addmm(self.side1_b, side, self.side1_w.t()).relu_()
        return h_old, h_side

    def _forward_addmm(
        self, old: torch.Tensor, side: torch.Tensor | None, differentiable: bool
    ) -> torch.Tensor:
        h_old, h_side = self._first_layers(old, side)
        half = 2 * self.d_new
        if differentiable or torch.compiler.is_compiling():
            # addmm(out=...) refuses autograd, and Inductor fuses the concatenation itself.
            mixed = torch.cat(
                [
                    torch.addmm(self.old2_b, h_old, self.old2_w.t()),
                    torch.addmm(self.side2_b, h_side, self.side2_w.t()),
                ],
                dim=1,
            ).relu()
        else:
            mixed = h_old.new_empty(old.shape[0], 2 * half)
            torch.addmm(self.old2_b, h_old, self.old2_w.t(), out=mixed[:, :half])
            torch.addmm(self.side2_b, h_side, self.side2_w.t(), out=mixed[:, half:])
            mixed.relu_()
        x = torch.addmm(self.mix1_b, mixed, self.mix1_w.t()).relu_()
        x = torch.addmm(self.mix2_b, x, self.mix2_w.t()).relu_()
        return torch.addmm(self.out_b, x, self.out_w.t())

    @property
    def block_diagonal(self) -> bool:
        """Whether the oneDNN path fuses the two branches into block-diagonal GEMMs.

        Fusing saves a concatenation copy and runs fewer, larger GEMMs, but multiplies the
        zero blocks too. It is used when those wasted multiply-adds are at most
        ``onednn.BLOCK_DIAGONAL_MAX_WASTE`` of h's (3.4 % at the reference 128/128/128, 2.3 %
        without side-information; the quickstart's 128/128/64 with hidden 512 would waste 18 %).
        """
        macs = transformation_flops(self.d_old, self.d_new, self.d_side, self.hidden) // 2
        return onednn.block_diagonal_pays(self.d_old, self.d_new, self.d_side, macs)

    def _onednn_plan(self, batch: int) -> onednn.Plan:
        """The oneDNN kernel plan (see fct.models.onednn.build_plan), rebuilt when a buffer
        changed; the branches are fused when ``block_diagonal``."""
        buffers = dict(sorted(self.named_buffers()))
        key = onednn.plan_key(buffers.values())
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        plan = onednn.build_plan(buffers, self.d_side, self.block_diagonal, batch)
        self._packed = (key, plan)
        return plan

    def _forward_onednn(self, old: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        return onednn.run_plan(self._onednn_plan(old.shape[0]), old, side, self.d_old)


def fold_batchnorm(h: Transformation, backend: str = "auto") -> FoldedTransformation:
    """A fresh inference module equal to ``h.eval()``, BatchNorm folded into the Linears.

    Uses the running statistics (what eval mode uses) whatever mode ``h`` is in; ``h`` is not
    modified. ``backend`` picks the kernels (see FoldedTransformation).
    """
    if not isinstance(h, Transformation):
        raise FCTError(f"fold_batchnorm expects a Transformation, got {type(h).__name__}")
    return FoldedTransformation(h, backend=backend)


def transformation_flops(d_old: int, d_new: int, d_side: int = 0, hidden: int = 2048) -> int:
    """FLOPs per item of h (2 x multiply-adds of its linear layers), for throughput reports.

    Counts the GEMMs only (BatchNorm folds away; bias, ReLU and BN are elementwise and
    negligible). ``d_side=0`` counts the side branch at input width d_old, as h computes it.
    """
    _check_dims(d_old, d_new, d_side, hidden)
    d_side_in = d_side or d_old
    macs = (
        d_old * 2 * d_old
        + 2 * d_old * 2 * d_new
        + d_side_in * 2 * d_side_in
        + 2 * d_side_in * 2 * d_new
        + 4 * d_new * hidden
        + hidden * hidden
        + hidden * d_new
    )
    return 2 * macs
