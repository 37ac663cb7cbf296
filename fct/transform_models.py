"""What ``fct transform`` applies: a trained map from stored (old) embeddings to new ones,
loaded from the artifact cache or from a safetensors file, through a table keyed by its kind.

An ARTIFACT is

- the name of a finished cache entry of kind ``transformations`` (``NAME-DIGEST``, as
  ``fct list transformations`` prints it; ``transformations/NAME-DIGEST`` also works), verified
  against its manifest before it is read; or
- a ``.safetensors`` file whose header metadata says what it holds: ``fct.kind`` (a key of
  ``LOADERS``) and ``fct.config`` (JSON: the architecture, e.g. ``{"d_old": 128, "d_new": 128,
  "d_side": 0, "hidden": 2048}`` for FCT's h). Without that metadata a sidecar JSON beside the
  file (``NAME.json`` for ``NAME.safetensors``) holding ``{"kind": ..., "config": {...}}`` is
  read instead. ``save_transformation`` writes the metadata form.

``LOADERS`` maps a kind to a function (tensors, config, where) -> ``Mapper``; a new family of
maps (the adapters) registers its kind there. Every refusal is one FCTError line.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fct.errors import FCTError

#: The header metadata keys of a transformation file.
KIND_KEY, CONFIG_KEY = "fct.kind", "fct.config"
SIDECAR_MAX = 1 << 20


@dataclass
class Mapper:
    """A loaded map: ``fn(old [N, d_in], side [N, d_side] or None) -> [N, d_out]`` float32."""

    kind: str
    d_in: int
    d_side: int
    d_out: int
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    #: What was loaded, for the summary line (entry name or file path).
    source: str
    #: Identity of the weights (sha256 of the tensors file, plus the sidecar's when one was
    #: read): a transform's outputs are tied to it, so a rerun with other weights is refused.
    digest: str
    #: What it maps: ``"gallery"`` (stored old embeddings -> the new space: h, a gallery-side
    #: adapter) or ``"query"`` (new queries -> the old space: a query-side adapter).
    direction: str = "gallery"

    @torch.no_grad()
    def __call__(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """The map applied to one block of rows."""
        return self.fn(old, side)


# --- the loaders, by kind ---------------------------------------------------------------------


def _int(config: dict, key: str, where: str, low: int = 1) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1 << 16:
        raise FCTError(
            f"{where}: config '{key}' must be an integer in [{low}, 65536], got {value!r}"
        )
    return value


def _load_strict(module: torch.nn.Module, tensors: dict, where: str, what: str) -> None:
    """Load ``tensors`` into ``module`` exactly (no missing or extra key, every shape equal);
    otherwise one line naming the file, what it should hold and torch's first complaint."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise FCTError(
            f"{where}: its tensors are not {what} ({first.strip()[:200]}); check the file's fct.config"
        ) from None


def load_h(tensors: dict[str, torch.Tensor], config: dict, where: str) -> Mapper:
    """FCT's transformation h (fct.models.Transformation), run folded (BatchNorm folded, the
    fused oneDNN kernels on CPU: fct.models.transformation.FoldedTransformation)."""
    from fct.models import Transformation

    dims = [
        _int(config, k, where, 0 if k == "d_side" else 1)
        for k in ("d_old", "d_new", "d_side", "hidden")
    ]
    with torch.random.fork_rng(devices=[]):  # building the module draws initial weights
        h = Transformation(*dims)
    _load_strict(h, tensors, where, f"an FCT transformation of {config}")
    folded = h.eval().folded()
    return Mapper("transformation", h.d_old, h.d_side, h.d_new, folded, where, "")


def _adapter_map(kind: str, tensors: dict[str, torch.Tensor], config: dict, where: str) -> Mapper:
    """An adapter's fitted map (fct.methods.adapters: ``LinearMap`` or ``ResidualMLP``), built
    empty from its config's sizes and loaded strictly; config ``direction`` says what it maps
    (default ``gallery``), ``method`` which adapter fitted it (optional, for messages)."""
    from fct.methods.adapters import build_map

    sizes = {k: _int(config, k, where) for k in ("d_in", "d_out")}
    if kind == "residual_mlp":
        sizes["hidden"] = _int(config, "hidden", where)
        sizes["skip"] = config.get("skip")
        if not isinstance(sizes["skip"], bool):
            raise FCTError(f"{where}: config 'skip' must be true or false, got {sizes['skip']!r}")
    direction = config.get("direction", "gallery")
    if direction not in ("gallery", "query"):
        raise FCTError(
            f'{where}: config \'direction\' must be "gallery" or "query", got {direction!r}'
        )
    module = build_map(kind, sizes)
    _load_strict(module, tensors, where, f"a {kind} map of {sizes}")
    module.eval()
    return Mapper(
        kind, sizes["d_in"], 0, sizes["d_out"], lambda x, _s: module(x), where, "", direction
    )


#: kind -> loader: FCT's h, and the adapters' maps (procrustes, affine and low_rank fit a
#: ``linear`` map, mlp_adapter a ``residual_mlp``).
LOADERS: dict[str, Callable[[dict[str, torch.Tensor], dict, str], Mapper]] = {
    "transformation": load_h,
    "linear": functools.partial(_adapter_map, "linear"),
    "residual_mlp": functools.partial(_adapter_map, "residual_mlp"),
}


def _loader(kind: Any, where: str) -> Callable[[dict[str, torch.Tensor], dict, str], Mapper]:
    if not isinstance(kind, str) or kind not in LOADERS:
        raise FCTError(
            f"{where}: unknown artifact kind {kind!r}; fct transform applies {', '.join(sorted(LOADERS))}"
        )
    return LOADERS[kind]


# --- files ------------------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], kind: str, config: dict, path) -> Path:
    from safetensors.torch import save

    from fct.io import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    blob = save(state, metadata={KIND_KEY: kind, CONFIG_KEY: json.dumps(config)})
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return path


def save_transformation(h: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write FCT's h to ``path`` (safetensors, atomically) with the metadata ``fct transform``
    and ``load_artifact`` read: ``fct.kind = "transformation"`` and its ``fct.config``."""
    config = {"d_old": h.d_old, "d_new": h.d_new, "d_side": h.d_side, "hidden": h.hidden}
    return _save(h.state_dict(), "transformation", config, path)


def save_adapter(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    direction: str = "gallery",
    method: str | None = None,
) -> Path:
    """Write an adapter's fitted map (a ``LinearMap`` or ``ResidualMLP``) to ``path``
    (safetensors, atomically) with its ``fct.kind`` (``linear`` or ``residual_mlp``) and its
    ``fct.config``: sizes, ``direction`` (what it maps) and ``method`` (who fitted it)."""
    from fct.methods.adapters import map_config

    if direction not in ("gallery", "query"):
        raise FCTError(f'direction must be "gallery" or "query", got {direction!r}')
    kind, config = map_config(module)
    config = {**config, "direction": direction, **({"method": method} if method else {})}
    return _save(module.state_dict(), kind, config, path)


def save_cached(
    name: str, path: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None
) -> Path:
    """Write the cache entry ``name`` (as ``fct list transformations`` prints it) to ``path``
    in the file form ``load_artifact`` reads (fct.kind, fct.config), atomically."""
    found = _find_cached(name, cache)
    if found is None:
        raise FCTError(
            f"no transformation '{name}' in the cache; `fct list transformations` lists them"
        )
    entry, meta = found
    tensors, _ = entry.load()
    kind, config = _entry_map(entry, meta, tensors)
    return _save(tensors, kind, config, path)


def _file_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise FCTError(
            f"{path} is not a readable safetensors file ({str(e)[:120]}); pass a transformation "
            "saved by fct (fct.transform_models.save_transformation) or a cache entry name"
        ) from None


def _sidecar(path: Path) -> tuple[dict, str] | None:
    from fct.io import read_regular_bytes

    side = path.with_suffix(".json")
    if not side.exists():
        return None
    data = read_regular_bytes(
        side, SIDECAR_MAX, "sidecar JSON", "pass a JSON object of kind and config"
    )
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict):
        raise FCTError(
            f'{side}: a sidecar must be a JSON object {{"kind": ..., "config": {{...}}}}; fix it'
        )
    import hashlib

    return obj, hashlib.sha256(data).hexdigest()


def load_file(path: Path) -> Mapper:
    """A map from a safetensors file, described by its metadata or its sidecar JSON."""
    from safetensors.torch import load_file as read

    from fct.io import sha256_regular

    where = str(path)
    meta = _file_header(path)
    extra = ""
    if KIND_KEY in meta:
        kind = meta[KIND_KEY]
        try:
            config = json.loads(meta.get(CONFIG_KEY, ""))
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise FCTError(f"{where}: metadata {CONFIG_KEY} is not a JSON object; rewrite the file")
    else:
        found = _sidecar(path)
        if found is None:
            raise FCTError(
                f"{where} does not say what it holds (no {KIND_KEY} metadata and no sidecar "
                f"{path.with_suffix('.json').name}); add the sidecar JSON or save it with "
                "fct.transform_models.save_transformation"
            )
        (obj, extra) = found
        kind, config = obj.get("kind"), obj["config"]
    loader = _loader(kind, where)
    digest, _ = sha256_regular(path)
    mapper = loader(read(str(path)), config, where)
    mapper.digest = digest + (f"+{extra}" if extra else "")
    return mapper


# --- the cache --------------------------------------------------------------------------------


def _entry_map(entry, meta: dict, shapes: dict) -> tuple[str, dict]:
    """(kind, config) of a cache entry: an adapter's map says it in its meta (``map``); FCT's
    h is read off its tensors' shapes (``shapes``: tensors, or (shape, offset) pairs)."""
    where = f"cache entry {entry.kind}/{entry.path.name}"
    spec = meta.get("map")
    if spec is not None:
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise FCTError(f"{where}: its meta.json 'map' is not a kind and config; refit it")
        return spec.get("kind"), spec["config"]
    return "transformation", _h_config(shapes, entry.key, where)


def _describe(kind: str, c: dict, meta: dict, key: dict) -> str:
    seconds = float(meta.get("train_seconds", 0))
    if kind == "transformation":
        what = f"h {c['d_old']}->{c['d_new']}" + (f" + side {c['d_side']}" if c["d_side"] else "")
        return f"{what}, hidden {c['hidden']}, trained {seconds:.0f} s"
    run, base = c.get("method") or key.get("run_name"), key.get("adapter")
    who = f"adapter {run}" + (f" ({base})" if base and base != run else "")
    maps = "maps queries new->old" if c.get("direction") == "query" else "maps the gallery old->new"
    hidden = f", hidden {c['hidden']}" if "hidden" in c else ""
    side = c.get("direction", "gallery")
    return f"{who}, {side} side ({maps}), {kind} {c['d_in']}->{c['d_out']}{hidden}, fit {seconds:.3g} s"


def cached_transformations(cache: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """(``NAME-DIGEST``, a description) of every finished, verified transformation in the
    cache: FCT's h (widths read from its file's header, no tensor is loaded, and its training
    time) or an adapter's map (its kind, sizes and direction from its meta, and its fit time)."""
    from fct.artifacts import TENSORS, default_cache_dir, list_entries
    from fct.pretrained import file_shapes

    root = Path(cache) if cache is not None else default_cache_dir()
    out = []
    for entry, meta in list_entries(root, "transformations"):
        shapes = {k: (v, 0) for k, v in file_shapes(str(entry.path / TENSORS)).items()}
        try:
            kind, config = _entry_map(entry, meta, shapes)
            what = _describe(kind, config, meta, entry.key)
        except (FCTError, KeyError, TypeError, ValueError):
            what = "a method's own transformation, " + (
                f"trained {float(meta.get('train_seconds', 0)):.0f} s"
            )
        out.append((entry.path.name, what))
    return out


def _h_config(tensors: dict[str, torch.Tensor], key: dict, where: str) -> dict:
    """h's dimensions read off its tensors (the key says whether it had side-information)."""

    def shape(name: str) -> tuple[int, ...]:
        t = tensors[name]
        return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t[0])

    try:
        d_old = int(shape("old_branch.0.0.weight")[1])
        d_new, hidden = (int(n) for n in shape("mixer.2.weight"))
        d_side_in = int(shape("side_branch.0.0.weight")[1])
    except (KeyError, IndexError, ValueError, TypeError):
        raise FCTError(
            f"{where} is not FCT's h (a method's own transformation); fct transform applies FCT's h"
        ) from None
    return {
        "d_old": d_old,
        "d_new": d_new,
        "d_side": 0 if key.get("side") is None else d_side_in,
        "hidden": hidden,
    }


def _find_cached(name: str, cache: str | os.PathLike[str] | None):
    """(entry, meta) of the verified cache entry ``name`` (``NAME-DIGEST`` or
    ``transformations/NAME-DIGEST``), or None."""
    from fct.artifacts import default_cache_dir, list_entries

    root = Path(cache) if cache is not None else default_cache_dir()
    wanted = name.removeprefix("transformations/")
    for entry, meta in list_entries(root, "transformations"):
        if entry.path.name == wanted:
            return entry, meta
    return None


def load_cached(name: str, cache: str | os.PathLike[str] | None) -> Mapper | None:
    """The cache entry ``name`` (``NAME-DIGEST`` or ``transformations/NAME-DIGEST``), or None
    when the cache has no such entry: FCT's h, or an adapter's map (kind and config from its
    meta)."""
    from fct.artifacts import TENSORS
    from fct.io import sha256_regular

    found = _find_cached(name, cache)
    if found is None:
        return None
    entry, meta = found
    tensors, _ = entry.load()
    where = f"cache entry {entry.kind}/{entry.path.name}"
    kind, config = _entry_map(entry, meta, tensors)
    mapper = _loader(kind, where)(tensors, config, where)
    mapper.digest = sha256_regular(entry.path / TENSORS)[0]
    return mapper


def load_artifact(ref: str, cache: str | os.PathLike[str] | None = None) -> Mapper:
    """The map ARTIFACT names: an existing file, else a cache entry; FCTError otherwise."""
    path = Path(ref)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise FCTError(f"model file {path} does not exist (or is not a file); check the path")
        return load_file(path)
    found = load_cached(ref, cache)
    if found is None:
        where = cache if cache is not None else "the default cache ($FCT_CACHE or .fct-cache)"
        raise FCTError(
            f"unknown artifact '{ref}': no such file and no such transformation in {where}; "
            "`fct list transformations --cache DIR` lists the cache's, or pass a .safetensors file"
        )
    return found
