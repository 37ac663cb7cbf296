"""Embedding models (timm backbones with an embedding head) and FCT's transformation h.

- ``backbone``: ``EmbeddingModel`` (any timm architecture, trained from scratch, with a linear
  embedding head and a bias-free classifier, as in the FCT reference code), ``build_backbone``
  and ``check_arch``.
- ``transformation``: FCT's h (``Transformation``) and its inference form with BatchNorm
  folded in (``FoldedTransformation``, ``fold_batchnorm``), ``transformation_flops``.
- ``onednn``: the oneDNN probe and the folded h's oneDNN kernel plan on CPU.
- ``simclr``: ``SimCLRModel``, an encoder plus SimCLR's projection head (side-information).

timm is imported inside the functions that need it, so importing this package stays cheap.
"""

from fct.models.backbone import (
    EMBED_ACTS,
    SMALL_IMAGE_MAX,
    EmbeddingModel,
    build_backbone,
    check_arch,
)
from fct.models.onednn import BLOCK_DIAGONAL_MAX_WASTE, onednn_linear_available
from fct.models.simclr import SimCLRModel
from fct.models.transformation import (
    BACKENDS,
    FoldedTransformation,
    Transformation,
    fold_batchnorm,
    transformation_flops,
)

__all__ = [
    "BACKENDS",
    "BLOCK_DIAGONAL_MAX_WASTE",
    "EMBED_ACTS",
    "SMALL_IMAGE_MAX",
    "EmbeddingModel",
    "FoldedTransformation",
    "SimCLRModel",
    "Transformation",
    "build_backbone",
    "check_arch",
    "fold_batchnorm",
    "onednn_linear_available",
    "transformation_flops",
]
