"""Variants of a loaded suite: ``--smoke`` (every scenario shrunk to run on a CPU in minutes) and
``--global-batch`` (every backbone trained with another global batch, learning rate scaled).

Both take a validated fct.scenarios.Suite and return a new one; the runner never sees the
difference except through the specs (and so the cache keys) they change.
"""

from __future__ import annotations

import dataclasses

from fct.errors import FCTError
from fct.scenarios import ModelSpec, Scenario, Suite

# --- smoke mode -------------------------------------------------------------------------------

SMOKE_CLASSES = 10
SMOKE_PER_CLASS = 4
SMOKE_IMAGE = 32


def _smoke_classes(rng: tuple[int, int] | None, factor: float) -> tuple[int, int]:
    if rng is None:
        return (0, SMOKE_CLASSES)
    lo = int(round(rng[0] * factor))
    return (lo, max(lo + 1, int(round(rng[1] * factor))))


def smoke(sc: Scenario) -> Scenario:
    """Shrink a scenario so its whole wiring runs on a CPU in minutes.

    Class ranges are scaled onto the first 10 classes keeping their proportions (old on the
    first half stays the first half); a range of "all classes" becomes classes 0-9. Every
    split keeps 4 items per class, images are at most 32 px (with the architecture's own stem,
    not the small-image one, to stay cheap), models train 1 epoch and h 2 epochs.
    """
    specs = [sc.old, sc.new, sc.eval, *sc.models] + ([sc.side] if sc.side else [])
    ends = [s.classes[1] for s in specs if s.classes]
    total = max(ends, default=SMOKE_CLASSES)
    if ends and any(s.classes is None for s in (sc.new, sc.eval)):
        total = 2 * total  # "old = first half" is the usual pairing with an all-classes new model
    factor = SMOKE_CLASSES / total

    def model(s: ModelSpec) -> ModelSpec:
        if s.weights is not None:  # given weights fix the architecture: only the data shrinks
            return dataclasses.replace(
                s, classes=_smoke_classes(s.classes, factor), max_per_class=SMOKE_PER_CLASS
            )
        size = min(s.image_size or SMOKE_IMAGE, SMOKE_IMAGE)
        return dataclasses.replace(
            s,
            classes=_smoke_classes(s.classes, factor),
            max_per_class=SMOKE_PER_CLASS,
            image_size=size,
            epochs=1,
            batch_size=min(s.batch_size, 32),
            warmup_epochs=0.0,
            small_stem=False,
        )

    return dataclasses.replace(
        sc,
        old=model(sc.old),
        new=model(sc.new),
        side=model(sc.side) if sc.side else None,
        models=tuple(model(m) for m in sc.models),  # a sequence's generations
        transformation=dataclasses.replace(
            sc.transformation,
            epochs=2,
            warmup_epochs=0.0,
            batch_size=min(sc.transformation.batch_size, 64),
            hidden=min(sc.transformation.hidden, 256),
        ),
        eval=dataclasses.replace(
            sc.eval, classes=_smoke_classes(sc.eval.classes, factor), max_per_class=SMOKE_PER_CLASS
        ),
    )


def smoke_suite(suite: Suite) -> Suite:
    """The suite with every scenario shrunk by ``smoke`` (results go to a separate folder)."""
    return dataclasses.replace(
        suite, name=suite.name, scenarios=tuple(smoke(s) for s in suite.scenarios)
    )


def with_global_batch(suite: Suite, batch: int) -> Suite:
    """Every backbone (old, new, side) trained with global batch ``batch``, its learning rate
    scaled by ``batch / batch_size`` (the linear scaling rule of Goyal et al., 2017).

    For multi-GPU runs that want a larger batch than the suite's: the suite's batch sizes are
    global batches already, so leaving them alone gives the same training on any number of
    processes. The transformation h (trained on stored embeddings) keeps its settings.
    """
    if batch < 1:
        raise FCTError(f"--global-batch must be a positive integer, got {batch}")

    def model(s: ModelSpec) -> ModelSpec:
        return dataclasses.replace(s, batch_size=batch, lr=s.lr * batch / s.batch_size)

    scenarios = tuple(
        dataclasses.replace(
            sc,
            old=model(sc.old),
            new=model(sc.new),
            side=model(sc.side) if sc.side else None,
            models=tuple(model(m) for m in sc.models),
        )
        for sc in suite.scenarios
    )
    return dataclasses.replace(suite, scenarios=scenarios)
