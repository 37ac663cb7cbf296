"""What FCT's h is fitted on: one plain view, K cached augmented views, or online features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fct.artifacts import Cache
from fct.context import Context
from fct.h_data import cached_views, h_batches
from fct.scenarios import load_suite


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    sc = load_suite("tiny").scenarios[0]
    small = dataclasses.replace(sc.new, epochs=1, max_per_class=8)
    sc = dataclasses.replace(
        sc,
        old=dataclasses.replace(sc.old, epochs=1, max_per_class=8),
        new=small,
        side=dataclasses.replace(sc.side, epochs=1, max_per_class=8),
    )
    return Context(sc, Cache(tmp_path_factory.mktemp("hv-cache")), seed=3)


def _spec(ctx: Context, **kw):
    return dataclasses.replace(ctx.scenario.transformation, batch_size=32, **kw)


def test_views_are_augmented_and_alternate_by_epoch(ctx: Context) -> None:
    old, new = ctx.old_model(), ctx.new_model()
    assert cached_views(_spec(ctx)) == [0]
    assert cached_views(_spec(ctx, views=3)) == [1, 2, 3]
    plain, _ = ctx.embed(new, "new-train")
    v1, y1 = ctx.embed(new, "new-train", view=1)
    v2, _ = ctx.embed(new, "new-train", view=2)
    assert v1.shape == plain.shape and torch.equal(y1, ctx.embed(new, "new-train")[1])
    assert not torch.allclose(v1, plain) and not torch.allclose(v1, v2)
    # the same augmented images whichever model embeds them: old and new of one view pair up
    o1 = ctx.embed(old, "new-train", view=1)[0]
    assert torch.equal(o1, ctx.embed(old, "new-train", view=1)[0])
    batches, steps = h_batches(ctx, _spec(ctx, views=2), (old, new, None), True, "t")
    # epoch 0 fits on view 1, epoch 1 on view 2, epoch 2 on view 1 again
    firsts = []
    for epoch in range(3):
        o, s, t, labels = next(iter(batches(epoch)))
        assert s is None and labels is not None and len(o) == len(t)
        rows = [torch.nonzero((v == t[0]).all(1)).numel() > 0 for v in (v1, v2)]
        firsts.append(rows.index(True) + 1)
    assert firsts == [1, 2, 1]


def test_online_features_come_from_fresh_augmented_batches(ctx: Context) -> None:
    old, new, side = ctx.old_model(), ctx.new_model(), ctx.side_model()
    spec = _spec(ctx, features="online")
    batches, steps = h_batches(ctx, spec, (old, new, side), False, "t")
    assert steps >= 1
    o0, s0, t0, labels = next(iter(batches(0)))
    o1, _, t1, _ = next(iter(batches(1)))
    assert labels is None and s0 is not None
    assert o0.shape[1] == old.spec.embedding_dim and t0.shape[1] == new.spec.embedding_dim
    assert not torch.allclose(t0, t1)  # another epoch, other augmentations
    again = next(iter(batches(0)))[2]
    assert torch.equal(t0, again)  # the same epoch draws the same augmentations
    plain = ctx.embed(new, "new-train")[0]
    assert not any(torch.allclose(t0[0], row, atol=1e-5) for row in plain)  # augmented


def test_h_cache_key_says_how_it_was_fitted(ctx: Context, tmp_path: Path) -> None:
    new = ctx.new_model()
    a = ctx.transformation(new, use_side=False, spec=_spec(ctx, epochs=1))
    b = ctx.transformation(new, use_side=False, spec=_spec(ctx, epochs=1, views=2))
    c = ctx.transformation(new, use_side=False, spec=_spec(ctx, epochs=1, features="online"))
    assert len({a.digest, b.digest, c.digest}) == 3
