"""Embedding models (timm backbones with an embedding head) and FCT's transformation h.

- ``EmbeddingModel``: any timm architecture, trained from scratch, with a linear embedding
  head and a bias-free classifier, as in the FCT reference code.
- ``Transformation``: FCT's h, old embedding (+ side-information) -> new embedding, with the
  reference code's widths, so parameter counts match it.
- ``FoldedTransformation`` / ``fold_batchnorm``: h for inference with BatchNorm folded into
  the linear layers and fused GEMM + bias + ReLU kernels (docs/throughput.md).

timm is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

from fct.errors import FCTError
from fct.registry import did_you_mean

EMBED_ACTS = ("none", "relu")

# At or below this input size the ImageNet stems (stride 4 for ResNet and ConvNeXt, 16-pixel
# patches for ViT) would shrink a 28/32px image to a map too small to learn from.
SMALL_IMAGE_MAX = 64


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def check_arch(name: str) -> str:
    """Validate a timm architecture name without building the model; returns the name.

    Raises FCTError for an unknown name (with a did-you-mean over ``timm.list_models()``),
    a deprecated alias, or a pretrained tag (models here are always trained from scratch,
    and one architecture should have one name so cached artifacts are not duplicated).
    """
    import timm
    from timm.models import _registry

    if not isinstance(name, str) or not name:
        raise FCTError(f"architecture must be a timm model name, got {name!r}")
    base, _, tag = name.partition(".")
    if tag and timm.is_model(base):
        raise FCTError(
            f"timm architecture '{name}' has a pretrained tag; models are trained from scratch "
            f"here, use '{base}'"
        )
    # Deprecated aliases build a renamed model; one name per architecture keeps cache keys
    # unique. The table is private to timm, so it is read defensively.
    deprecated = getattr(_registry, "_deprecated_models", {}) or {}
    if deprecated.get(name):
        new = str(deprecated[name]).partition(".")[0]
        raise FCTError(f"timm architecture '{name}' is deprecated; use '{new}'")
    if timm.is_model(name):
        return name
    hint = did_you_mean(name, timm.list_models())
    where = "" if hint else "; list them with timm.list_models('PATTERN')"
    raise FCTError(f"unknown timm architecture '{name}'{hint}{where}")


def _small_image_kwargs(arch: str, image_size: int) -> dict[str, Any]:
    """timm constructor arguments that adapt ``arch`` to ``image_size`` (may be unsupported)."""
    from timm.models import _registry

    kwargs: dict[str, Any] = {"img_size": image_size}
    if image_size > SMALL_IMAGE_MAX:
        return kwargs
    small_patch = 4 if image_size <= 32 else 8
    # ViT-like names carry their patch size ("vit_tiny_patch16_224", "swin_..._patch4_...");
    # a smaller patch keeps a useful token grid (32px / 4 = 8 x 8 tokens).
    match = re.search(r"patch(\d+)", arch)
    if match and int(match.group(1)) > small_patch:
        kwargs["patch_size"] = small_patch
    # ConvNeXt's patchify stem has stride 4; stride 2 keeps a 2 x 2 map at the end at 32px.
    if getattr(_registry, "_model_to_module", {}).get(arch) == "convnext":
        kwargs["patch_size"] = 2
    return kwargs


def _create_timm(
    arch: str, in_chans: int, extra: dict[str, Any], required: frozenset[str] = frozenset()
) -> nn.Module:
    """timm.create_model with ``extra`` arguments, dropping those the architecture rejects.

    timm passes keyword arguments through to the model class, so an unsupported one raises
    TypeError at argument binding, before any weights are allocated: retrying is cheap, and
    avoids keeping a per-family table of which constructor takes ``img_size``.
    """
    import timm

    extra = dict(extra)
    while True:
        try:
            return timm.create_model(
                arch, pretrained=False, num_classes=0, in_chans=in_chans, **extra
            )
        except TypeError as err:
            message = str(err)
            rejected = [k for k in extra if f"unexpected keyword argument '{k}'" in message]
            if not rejected or set(rejected) & required:
                raise
            for key in rejected:
                del extra[key]


def _is_resnet_like(model: nn.Module) -> bool:
    return isinstance(getattr(model, "conv1", None), nn.Module) and isinstance(
        getattr(model, "maxpool", None), nn.Module
    )


def _cifar_stem(model: nn.Module, in_chans: int) -> None:
    """Replace a ResNet stem (7x7/2 conv + 3x3/2 max-pool) with a 3x3/1 conv and no pool.

    This is the usual CIFAR ResNet: a 32px image enters layer1 at 32 x 32 instead of 8 x 8.
    Deep stems (resnet50d: a Sequential of three convs) are replaced by one conv with the
    stem's output width, so ``bn1`` and ``layer1`` still fit.
    """
    convs = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)]
    width = convs[-1].out_channels
    conv = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init as timm's ResNet, so the swap does not change the training recipe.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = nn.Identity()


def build_backbone(
    arch: str,
    in_chans: int = 3,
    image_size: int = 224,
    arch_args: dict[str, Any] | None = None,
    small_stem: bool | None = None,
) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0``), adapted to small images.

    Returns a module mapping ``[N, in_chans, image_size, image_size]`` to pooled features
    ``[N, F]``. Adaptations when ``image_size <= 64``:

    - ResNet family (a model with ``conv1`` and ``maxpool``): CIFAR-style 3x3 stride-1 stem,
      no max-pool.
    - ViT-like archs whose name carries ``patchN``: ``patch_size`` 4 (<= 32px) or 8 (<= 64px).
    - ConvNeXt: ``patch_size=2`` (stem stride 2 instead of 4).
    - All archs get ``img_size=image_size`` where their constructor accepts it (ViT, Swin, ...).
    - Other families keep their ImageNet stem: they run, but a 32px image ends as a 1 x 1 map.

    ``arch_args`` are passed to ``timm.create_model`` (e.g. ``channels`` for a narrow ResNet)
    and win over the adaptations above; ``small_stem`` forces the ResNet stem swap on (True)
    or off (False, e.g. to keep a CPU-sized network cheap) instead of deciding by size.
    """
    check_arch(arch)
    extra = _small_image_kwargs(arch, image_size) | dict(arch_args or {})
    try:
        model = _create_timm(arch, in_chans, extra, required=frozenset(arch_args or {}))
    except TypeError as e:
        raise FCTError(
            f"timm rejected arch_args {dict(arch_args or {})} for '{arch}' ({e}); fix arch_args"
        ) from e
    if small_stem is None:
        small_stem = image_size <= SMALL_IMAGE_MAX
    if small_stem and _is_resnet_like(model):
        _cifar_stem(model, in_chans)
    return model


def _feature_dim(backbone: nn.Module) -> int:
    # Some timm models (MobileNetV3, ...) pool into a wider head: its width is what forward
    # returns with num_classes=0, and timm records it as head_hidden_size.
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FCTError(f"{name} must be a positive integer, got {value!r}")
    return value


class EmbeddingModel(nn.Module):
    """A timm backbone, a linear embedding head and a bias-free classifier.

    ``forward(x)`` returns ``(embedding [N, embedding_dim], logits [N, num_classes])``;
    ``embed(x)`` returns the embedding only. With ``embed_act="relu"`` the embedding is
    post-ReLU and not normalised, like the FCT reference ResNet whose last block outputs the
    embedding. The classifier has no bias (as the reference), so cosine-margin losses can use
    its weight directly as class centres.

    Args:
        arch: a timm architecture name (``timm.list_models()``), built with pretrained=False.
        embedding_dim: size of the embedding.
        num_classes: number of classifier outputs.
        in_chans: image channels (1 for MNIST-like data).
        image_size: input height and width; small sizes adapt the stem (see build_backbone).
        embed_act: "none" or "relu", applied after the embedding head.
        arch_args: extra ``timm.create_model`` keyword arguments.
        small_stem: force the CIFAR-style ResNet stem on or off (None: by image size).
    """

    def __init__(
        self,
        arch: str,
        embedding_dim: int,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 224,
        embed_act: str = "none",
        arch_args: dict[str, Any] | None = None,
        small_stem: bool | None = None,
    ) -> None:
        super().__init__()
        if embed_act not in EMBED_ACTS:
            raise FCTError(f"embed_act must be one of {', '.join(EMBED_ACTS)}, got {embed_act!r}")
        self.arch = arch
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.in_chans = _positive_int("in_chans", in_chans)
        self.image_size = _positive_int("image_size", image_size)
        self.embed_act = embed_act
        self.backbone = build_backbone(
            arch,
            in_chans=in_chans,
            image_size=image_size,
            arch_args=arch_args,
            small_stem=small_stem,
        )
        self.head = nn.Linear(_feature_dim(self.backbone), embedding_dim)
        self.act = nn.ReLU() if embed_act == "relu" else nn.Identity()
        self.classifier = nn.Linear(embedding_dim, num_classes, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding ``[N, embedding_dim]`` of images ``[N, in_chans, H, W]``."""
        return self.act(self.head(self.backbone(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [N, embedding_dim], logits [N, num_classes])`` of images ``x``."""
        embedding = self.embed(x)
        return embedding, self.classifier(embedding)


# --------------------------------------------------------------------------------------------
# The transformation h
# --------------------------------------------------------------------------------------------


def _block(d_in: int, d_out: int) -> nn.Sequential:
    # Bias-free linear: the BatchNorm after it has its own shift (the reference's ConvBlock
    # has a conv bias only when there is no normaliser).
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU())


def _check_dims(d_old: int, d_new: int, d_side: int, hidden: int) -> None:
    _positive_int("d_old", d_old)
    _positive_int("d_new", d_new)
    _positive_int("hidden", hidden)
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
        if backend == "onednn" and not onednn_linear_available():
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
        self._packed: tuple[tuple, list] | None = None

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
            and onednn_linear_available(weight.dtype)
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
        ``BLOCK_DIAGONAL_MAX_WASTE`` of h's (3.4 % at the reference 128/128/128, 2.3 % without
        side-information; the quickstart's 128/128/64 with hidden 512 would waste 18 %).
        """
        d_side_in = self.d_side or self.d_old
        stacked_first = self.d_side == 0  # both branches read old: stacked, nothing wasted
        waste = 2 * self.d_new * 2 * d_side_in + 2 * self.d_new * 2 * self.d_old
        if not stacked_first:
            waste += 2 * self.d_old * d_side_in + 2 * d_side_in * self.d_old
        macs = transformation_flops(self.d_old, self.d_new, self.d_side, self.hidden) // 2
        return waste <= BLOCK_DIAGONAL_MAX_WASTE * macs

    def _onednn_plan(self, batch: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, str]]]:
        """(packed weight, bias, activation) per oneDNN layer, rebuilt when a buffer changed.

        ``fused``: the whole h as one chain (branches block-diagonal, see ``block_diagonal``);
        or ``old``, ``side`` (the two branch chains; ``first`` is the stacked first layer when
        d_side=0) and ``mixer``.
        """
        buffers = [b for _, b in sorted(self.named_buffers())]
        # Inference tensors (made under inference_mode) have no version counter.
        key = tuple(
            (b.data_ptr(), -1 if b.is_inference() else b._version, b.dtype, b.device)
            for b in buffers
        )
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]

        def pack(
            w: torch.Tensor, b: torch.Tensor, act: str = "relu"
        ) -> tuple[torch.Tensor, torch.Tensor, str]:
            # The batch size is a layout hint only: the packed weights serve any batch.
            reorder = torch.ops.mkldnn._reorder_linear_weight
            return reorder(w.contiguous(), max(batch, 1)), b.contiguous(), act

        mixer = [
            pack(self.mix1_w, self.mix1_b),
            pack(self.mix2_w, self.mix2_b),
            pack(self.out_w, self.out_b, "none"),
        ]
        old2, side2 = (self.old2_w, self.old2_b), (self.side2_w, self.side2_b)
        second = pack(torch.block_diag(old2[0], side2[0]), torch.cat([old2[1], side2[1]]))
        if self.d_side == 0:
            first = pack(self.in_w, self.in_b)
            plan = (
                {"fused": [first, second, *mixer]}
                if self.block_diagonal
                else {"first": [first], "old": [pack(*old2)], "side": [pack(*side2)]}
            )
        elif self.block_diagonal:
            w = torch.block_diag(self.old1_w, self.side1_w)
            first = pack(w, torch.cat([self.old1_b, self.side1_b]))
            plan = {"fused": [first, second, *mixer]}
        else:
            plan = {
                "old": [pack(self.old1_w, self.old1_b), pack(*old2)],
                "side": [pack(self.side1_w, self.side1_b), pack(*side2)],
            }
        plan.setdefault("mixer", mixer)
        self._packed = (key, plan)
        return plan

    def _forward_onednn(self, old: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        plan = self._onednn_plan(old.shape[0])

        def chain(x: torch.Tensor, layers: list) -> torch.Tensor:
            for weight, bias, act in layers:
                x = torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "")
            return x

        if "fused" in plan:
            # One small [N, d_old + d_side] copy of the inputs; the branch outputs then come
            # out of the block-diagonal GEMMs already concatenated, as the mixer wants them.
            return chain(old if side is None else torch.cat([old, side], dim=1), plan["fused"])
        if side is None:
            first = chain(old, plan["first"])
            split = 2 * self.d_old
            old_in, side_in = first[:, :split], first[:, split:]
            h_old, h_side = chain(old_in, plan["old"]), chain(side_in, plan["side"])
        else:
            h_old, h_side = chain(old, plan["old"]), chain(side, plan["side"])
        return chain(torch.cat([h_old, h_side], dim=1), plan["mixer"])


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
