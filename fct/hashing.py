"""Stable hashes of plain JSON-able configs (cache keys, record hashes) and the conversion of
frozen config dataclasses to plain data. Ground floor: imports nothing of fct."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in fields(obj):
            v = getattr(obj, f.name)
            # A key added after configs were hashed enters the hash only when set, so
            # existing configs keep their hashes; ``plain`` turns its value into what
            # identifies it (a weights file: its sha256, not where it lies).
            if f.metadata.get("hash_when_set") and v is None:
                continue
            if f.metadata.get("plain") is not None:
                out[f.name] = f.metadata["plain"](v)
            elif f.name in ("arch_args", "loss_args"):
                out[f.name] = {k: _plain(x) for k, x in v}
            else:
                out[f.name] = _plain(v)
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
