"""SimCLR's training wrapper: an encoder plus the projection MLP its loss is computed on."""

from __future__ import annotations

import torch
from torch import nn


class SimCLRModel(nn.Module):
    """An encoder (EmbeddingModel) plus SimCLR's projection MLP, used only for the loss."""

    def __init__(self, encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The side-information vector ψ(x) (the representation, before the projection)."""
        return self.encoder.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder.embed(x))
