"""The one place a device name from the user (``--device``, a suite, an API call) is checked.

``fct run``, ``fct evaluate``, ``fct bench`` and the torchrun setup all resolve their device
here, so every command accepts the same names and refuses the rest with the same one-line
message: ``auto``, ``cpu``, ``cuda`` and ``cuda:N``. Anything else torch might parse (``mps``,
``meta``, ``xla``, ``cpu:1``) is refused, because nothing in fct is written or tested for it.
"""

from __future__ import annotations

import re

import torch

from fct.errors import FCTError

NAMES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d{1,4}))?")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch.device for ``name``: ``auto`` (cuda when torch sees a GPU, else cpu), ``cpu``,
    ``cuda`` or ``cuda:N``.

    Raises FCTError (one line naming the fix) for any other name, for ``cuda`` when torch sees
    no GPU, and for ``cuda:N`` when the machine has N GPUs or fewer: all of them would
    otherwise fail later, inside torch, with a traceback or after work was done.
    """
    text = str(name).strip().lower() if isinstance(name, str | torch.device) else None
    match = _PATTERN.fullmatch(text) if text is not None else None
    # An index belongs to cuda only; "auto:0" or "cpu:1" is a typo, not a request.
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise FCTError(f"unknown device {str(name)!r}; use {NAMES}")
    kind, index = match[1], match[2]
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda" if available else "cpu")
    if not available:
        raise FCTError(
            f"device '{text}': CUDA is not available (torch sees no GPU); use --device cpu or auto"
        )
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise FCTError(
            f"device '{text}': this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}; "
            "pick one of those or use --device cuda"
        )
    return torch.device("cuda", int(index))
