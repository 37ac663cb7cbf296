"""What ``fct bench transformation`` measures: the sizes presets (h and the backfill model),
default batch sizes, and the device and dtype names it accepts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fct.device import resolve_device
from fct.errors import FCTError

__all__ = [
    "DEFAULT_BATCHES",
    "DTYPES",
    "QUICK_BATCHES",
    "SIZES",
    "VARIANTS",
    "Sizes",
    "dtype_name",
    "get_sizes",
    "resolve_device",
    "resolve_dtype",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VARIANTS = ("eager", "folded", "compiled")


@dataclass(frozen=True)
class Sizes:
    """The dimensions of h and of the new model whose forward pass is the backfill cost."""

    name: str
    d_old: int
    d_new: int
    d_side: int
    hidden: int
    arch: str
    num_classes: int
    in_chans: int
    image_size: int
    small_stem: bool | None
    backfill_batch_cpu: int
    backfill_batch_cuda: int


SIZES = {
    # The FCT paper's setting: ResNet50 at 224 px with 128-d embeddings, h with side-info.
    "reference": Sizes("reference", 128, 128, 128, 2048, "resnet50", 1000, 3, 224, None, 32, 256),
    # fct/suites/quickstart.toml: Fashion-MNIST, timm's test_resnet, 64-d side-info, hidden 512.
    "quickstart": Sizes(
        "quickstart", 128, 128, 64, 512, "test_resnet", 10, 1, 28, False, 1024, 4096
    ),
}

# Default h batch sizes. CPU: 4096 is the size apply_transformation uses.
DEFAULT_BATCHES = {"cpu": (4096,), "cuda": (4096, 65536)}
QUICK_BATCHES = (1024,)


def get_sizes(sizes: str | Sizes) -> Sizes:
    """A Sizes by name (``reference``, ``quickstart``) or the Sizes itself."""
    if isinstance(sizes, Sizes):
        return sizes
    if sizes not in SIZES:
        raise FCTError(f"unknown sizes '{sizes}'; choose one of {', '.join(SIZES)}")
    return SIZES[sizes]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32`` or ``bfloat16`` (a name or the torch dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise FCTError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
