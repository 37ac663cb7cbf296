"""Timm backbones adapted to small images, and ``EmbeddingModel`` (backbone + linear
embedding head + bias-free classifier), as in the FCT reference code.

timm is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from fct.errors import FCTError
from fct.models.checks import positive_int
from fct.registry import did_you_mean

EMBED_ACTS = ("none", "relu")

# At or below this input size the ImageNet stems (stride 4 for ResNet and ConvNeXt, 16-pixel
# patches for ViT) would shrink a 28/32px image to a map too small to learn from.
SMALL_IMAGE_MAX = 64


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
        self.embedding_dim = positive_int("embedding_dim", embedding_dim)
        self.num_classes = positive_int("num_classes", num_classes)
        self.in_chans = positive_int("in_chans", in_chans)
        self.image_size = positive_int("image_size", image_size)
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
