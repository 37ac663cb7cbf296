"""Model specs with trained weights (``weights = "PATH.safetensors"`` or ``"timm:TAG"``): loaded,
never trained, and stored in the cache like a trained model so the rest of the pipeline
(embeddings, methods, records) cannot tell the difference.

- A file holds the state dict of the model the spec describes (an ``EmbeddingModel``, or the
  SimCLR wrapper for side-information), as fct's cache saves it: the ``tensors.safetensors``
  of a trained model's cache entry is such a file. The classifier's rows may differ from the
  spec's classes (the file's are kept); every other tensor must have the spec's shape.
- ``timm:TAG`` loads timm's pretrained backbone ``ARCH.TAG`` from the Hugging Face hub; the
  embedding head and classifier keep their seeded initial weights. Needs the network
  (``FCT_NO_DOWNLOAD=1`` refuses it in one line).

This module reads files and checks them; fct.builders (``check_weights``, ``load_pretrained``)
builds the module a spec describes and puts it through the cache, under a key holding the
weights' identity (the file's sha256, or the timm tag and the seed of the head) and the spec,
so the entry's digest follows the file's content.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from fct.errors import FCTError
from fct.suite_checks import TIMM_WEIGHTS

if TYPE_CHECKING:
    from fct.scenarios import ModelSpec, Scenario


def file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, from its header (no data read)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FCTError(
            f"weights file {path} does not exist; check the path (relative to the suite file)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise FCTError(
            f"weights file {path} is not a readable safetensors file ({str(e)[:100]})"
        ) from None


def _classes_in(shapes: dict[str, tuple[int, ...]], side: bool) -> int:
    key = "encoder.classifier.weight" if side else "classifier.weight"
    shape = shapes.get(key)
    return int(shape[0]) if shape and len(shape) == 2 else 1


def check_fit(
    spec: ModelSpec, shapes: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]
) -> None:
    """Refuse (one line) a weights file whose tensors (``shapes``) do not fit the model the
    spec describes (``want``): a missing or foreign tensor, or another shape."""
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    if not (missing or extra or wrong):
        return
    if wrong:
        k = wrong[0]
        what = f"{k} is {list(shapes[k])}, the spec's model has {list(want[k])}"
    elif missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        what = f"it lacks {missing[0]}{more}"
    else:
        what = f"it holds {extra[0]}, which the spec's model does not have"
    raise FCTError(
        f"weights file {spec.weights} does not fit arch '{spec.arch}' with embedding_dim "
        f"{spec.embedding_dim} ({what}); make the spec describe the saved model"
    )


def check_download(spec: ModelSpec) -> None:
    """Refuse timm weights when downloads are off (``FCT_NO_DOWNLOAD``)."""
    if os.environ.get("FCT_NO_DOWNLOAD"):
        raise FCTError(_no_download(spec))


def _no_download(spec: ModelSpec) -> str:
    return (
        f"weights '{spec.weights}' are downloaded from the Hugging Face hub, but FCT_NO_DOWNLOAD "
        "is set (or there is no network); unset it and connect, or save the weights to a "
        ".safetensors file and name that"
    )


def _timm_backbone(spec: ModelSpec, model: nn.Module) -> None:
    """Load timm's pretrained ``ARCH.TAG`` backbone into ``model.backbone``."""
    check_download(spec)
    import timm

    name = f"{spec.arch}.{spec.weights[len(TIMM_WEIGHTS) :]}"
    try:
        src = timm.create_model(
            name, pretrained=True, num_classes=0, in_chans=model.in_chans, **dict(spec.arch_args)
        )
        model.backbone.load_state_dict(src.state_dict())
    except (RuntimeError, OSError, ValueError) as e:
        raise FCTError(
            f"cannot load timm weights {name} ({str(e).splitlines()[0][:160]}); check the tag, "
            "the network, and that small_stem / image_size match the pretrained model"
        ) from None


def is_timm(spec: ModelSpec) -> bool:
    """Whether the spec's weights are timm's pretrained tag (else a file)."""
    return spec.weights is not None and spec.weights.startswith(TIMM_WEIGHTS)


def file_classes(spec: ModelSpec, side: bool) -> int:
    """The classifier rows of the spec's weights file (1 when it has no classifier)."""
    return _classes_in(file_shapes(spec.weights), side)


def fill(module: nn.Module, spec: ModelSpec, side: bool) -> None:
    """Put the spec's weights into ``module`` (a file's whole state dict, or timm's backbone)."""
    from safetensors.torch import load_file

    if is_timm(spec):
        _timm_backbone(spec, module.encoder if side else module)
    else:
        module.load_state_dict(load_file(spec.weights))


#: Built-in methods that train a new model of their own (a loss term on the new model).
TRAINS_NEW = frozenset({"bct", "ract", "l2_bct"})


def refuse_trainers(sc: Scenario, methods: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Methods that would train the scenario's new model (BCT, RACT, L2-BCT, or a method
    declaring ``keeps_new_model = False``) while its weights are given: method -> why, for the
    runner to skip them and run the rest."""
    if sc.new.weights is None:
        return {}
    bases = {s.name: s.base for s in sc.method_specs}
    out = {}
    for m in methods:
        if bases.get(m, m) in TRAINS_NEW or type(sc.method(m)).keeps_new_model is False:
            out[m] = (
                "it trains the new model, whose weights this scenario gives (new.weights); "
                "drop new.weights to run it"
            )
    return out
