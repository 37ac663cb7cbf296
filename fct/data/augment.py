"""Batch-wise image augmentation on tensors (CPU or GPU, 1 or 3 channels).

Every function takes a float batch [B,C,H,W] in [0, 1] and a ``torch.Generator``. Random
parameters are drawn with that generator on its own device, in a fixed order, and then moved to
the batch's device: the same generator state gives the same augmentation on CPU and GPU.

Every draw is one value per image. Under torchrun a rank holds every W-th image of the global
batch, so it passes a ``RankDraws``: it draws the whole global batch's values and keeps its
own every W-th, and each image gets the augmentation it would get in a single process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def _check(x: torch.Tensor) -> None:
    """Reject batches the functions below would silently mangle."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise ValueError(
            f"expected a float batch [B,C,H,W] with C in (1, 3), got {x.dtype} {tuple(x.shape)}"
        )


class RankDraws:
    """A generator's per-image draws for one rank of W: rank r of a batch holds the global
    batch's images r, r + W, r + 2W, ..., so it draws W values per image and keeps those."""

    def __init__(self, gen: Draws, rank: int, world: int) -> None:
        self.gen, self.rank, self.world = gen, rank, world
        self.device = gen.device

    def rand(self, n: int) -> torch.Tensor:
        """This rank's ``n`` of ``n * world`` U(0, 1) draws."""
        full = torch.rand(n * self.world, generator=self.gen, device=self.device)
        return full[self.rank :: self.world]

    def randint(self, high: int, n: int) -> torch.Tensor:
        """This rank's ``n`` of ``n * world`` integer draws in [0, high)."""
        full = torch.randint(0, high, (n * self.world,), generator=self.gen, device=self.device)
        return full[self.rank :: self.world]


Draws = torch.Generator | RankDraws


def _rand(gen: Draws, n: int) -> torch.Tensor:
    if isinstance(gen, RankDraws):
        return gen.rand(n)
    return torch.rand(n, generator=gen, device=gen.device)


def _randint(gen: Draws, high: int, n: int) -> torch.Tensor:
    if isinstance(gen, RankDraws):
        return gen.randint(high, n)
    return torch.randint(0, high, (n,), generator=gen, device=gen.device)


def _uniform(gen: Draws, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    """``n`` draws from U(lo, hi) on ``device``."""
    return (_rand(gen, n) * (hi - lo) + lo).to(device)


def _coin(gen: Draws, n: int, p: float, device: torch.device) -> torch.Tensor:
    """``n`` booleans that are True with probability ``p``."""
    return (_rand(gen, n) < p).to(device)


def crop_padding(size: int) -> int:
    """Padding for the random-crop augmentation: 4 px at 32 px, scaled as size / 8."""
    return max(1, round(size / 8))


def supervised_augment(x: torch.Tensor, gen: Draws) -> torch.Tensor:
    """Random crop from a reflect-padded image (pad = size / 8) and a random horizontal flip.

    The standard CIFAR training augmentation, done as one gather for the whole batch.
    """
    _check(x)
    b, _, h, w = x.shape
    pad = min(crop_padding(min(h, w)), h - 1, w - 1)  # reflect padding must be < the size
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dev = x.device
    top = _randint(gen, 2 * pad + 1, b).to(dev)
    left = _randint(gen, 2 * pad + 1, b).to(dev)
    flip = _coin(gen, b, 0.5, dev)
    rows = top[:, None] + torch.arange(h, device=dev)
    cols = left[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is a reversed column index
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    x: torch.Tensor,
    gen: Draws,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize it back
    to the input size, and flip horizontally with probability 1/2 (one grid_sample)."""
    _check(x)
    b, dev = x.shape[0], x.device
    area = _uniform(gen, b, *scale, dev)
    aspect = torch.exp(_uniform(gen, b, math.log(ratio[0]), math.log(ratio[1]), dev))
    # Width and height as fractions of the side; clamping replaces torchvision's resampling.
    cw = torch.sqrt(area * aspect).clamp(max=1.0)
    ch = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = _uniform(gen, b, -1.0, 1.0, dev) * (1 - cw)
    cy = _uniform(gen, b, -1.0, 1.0, dev) * (1 - ch)
    sign = 1.0 - 2.0 * _coin(gen, b, 0.5, dev).to(x.dtype)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = cw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [B,1,H,W] of an RGB batch."""
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 matrices rotating RGB about the gray axis (a linear hue shift)."""
    # Rodrigues' formula with the unit axis k = (1, 1, 1) / sqrt(3).
    a = 1 / math.sqrt(3)
    like = {"dtype": angle.dtype, "device": angle.device}
    cross = torch.tensor([[0.0, -a, a], [a, 0.0, -a], [-a, a, 0.0]], **like)  # [k]x
    outer = torch.full((3, 3), 1 / 3, **like)  # k k^T
    eye = torch.eye(3, **like)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    return cos * eye + sin * cross + (1 - cos) * outer


def color_jitter(
    x: torch.Tensor, gen: Draws, strength: float = 0.4, hue: float = 0.1, p: float = 0.8
) -> torch.Tensor:
    """With probability ``p`` per image: brightness and contrast jitter (factors in
    1 +- strength), plus saturation jitter and a hue shift up to ``hue`` turns for RGB."""
    _check(x)
    b, c, dev = x.shape[0], x.shape[1], x.device
    apply = _coin(gen, b, p, dev)[:, None, None, None]
    brightness, contrast = (_uniform(gen, b, 1 - strength, 1 + strength, dev) for _ in range(2))
    out = (x * brightness[:, None, None, None]).clamp(0, 1)
    mean = (_gray(out) if c == 3 else out).mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast[:, None, None, None] + mean).clamp(0, 1)
    if c == 3:
        saturation = _uniform(gen, b, 1 - strength, 1 + strength, dev)
        gray = _gray(out)
        out = ((out - gray) * saturation[:, None, None, None] + gray).clamp(0, 1)
        rotation = _hue_rotation(_uniform(gen, b, -hue, hue, dev) * 2 * math.pi)
        out = torch.einsum("bij,bjhw->bihw", rotation.to(out.dtype), out).clamp(0, 1)
    return torch.where(apply, out, x)


def random_grayscale(x: torch.Tensor, gen: Draws, p: float = 0.2) -> torch.Tensor:
    """Replace RGB images by their luma (kept 3 channels) with probability ``p``; 1-channel
    batches pass through unchanged (no random numbers drawn)."""
    _check(x)
    if x.shape[1] == 1:
        return x
    to_gray = _coin(gen, x.shape[0], p, x.device)[:, None, None, None]
    return torch.where(to_gray, _gray(x).expand_as(x), x)


def simclr_view(x: torch.Tensor, gen: Draws) -> torch.Tensor:
    """One SimCLR view: random resized crop (scale 0.2-1) with flip, colour jitter, grayscale."""
    view = random_resized_crop(x, gen)
    view = color_jitter(view, gen)
    return random_grayscale(view, gen)


def simclr_views(x: torch.Tensor, gen: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent SimCLR views of the batch, for contrastive (side-information) training."""
    first = simclr_view(x, gen)
    return first, simclr_view(x, gen)
