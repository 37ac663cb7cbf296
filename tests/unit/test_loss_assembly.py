"""Every method's contribution to training, pinned on a fixed batch (issue 18, item 1).

The trainer's step function (fct.builders' closure handed to fct.train.train) is captured, run
on one fixed batch, and its loss compared with the main loss plus the method's weighted term,
both worked out here from the papers' formulas with plain loops (never through the code under
test). A term that is dropped, sign-flipped or mis-weighted, in the method or in the trainer's
loss assembly, changes the value and fails here. The methods are fitted on a fake Context that
hands out small fixed models and records what the method asks the Context to train.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fct import builders
from fct.artifacts import Cache
from fct.methods import METHODS
from fct.scenarios import load_suite
from fct.session import Session

SCENARIO = load_suite("tiny").scenarios[0]  # old: classes 0-9, new: 0-19, ce (smoothing 0.1)
D = SCENARIO.new.embedding_dim  # 32
SMOOTHING = 0.1  # the reference's label smoothing, the default of the `ce` loss


class Captured(Exception):
    """Raised by the patched trainer once it holds the step function."""


# --- independent formulas ---------------------------------------------------------------------


def smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    """-sum_c q_c log p_c with q = (1 - eps) onehot + eps / C (Szegedy et al. 2016)."""
    top = max(logits)
    lse = top + math.log(sum(math.exp(v - top) for v in logits))
    c = len(logits)
    return -sum(((1 - eps) * (k == target) + eps / c) * (v - lse) for k, v in enumerate(logits))


def mean_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    rows = logits.double().tolist()
    return sum(smoothed_ce(r, int(y), eps) for r, y in zip(rows, labels)) / len(rows)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / max(n, 1e-12) for a in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def l2_bct_term(new: torch.Tensor, old: torch.Tensor) -> float:
    """OpenCompatible's `l2`: mean over items and dimensions of (n/|n| - o/|o|)^2."""
    total, count = 0.0, 0
    for n, o in zip(new.double().tolist(), old.double().tolist()):
        for a, b in zip(unit(n), unit(o)):
            total += (a - b) ** 2
            count += 1
    return total / count


def ract_term(new, old, labels, temperature=0.01, topk=10) -> float:
    """RACT (Zhang et al. 2022): per anchor, -log of the positive (its own old embedding)
    against the k hardest other-class old and new embeddings, at temperature t; mean."""
    zn = [unit(v) for v in new.double().tolist()]
    zo = [unit(v) for v in old.double().tolist()]
    y = labels.tolist()
    total = 0.0
    for i in range(len(zn)):
        pos = dot(zn[i], zo[i]) / temperature
        others = [k for k in range(len(zn)) if y[k] != y[i]]
        to_old = sorted((dot(zn[i], zo[k]) / temperature for k in others), reverse=True)
        to_new = sorted((dot(zn[i], zn[k]) / temperature for k in others), reverse=True)
        if 0 < topk < len(zn):
            to_old, to_new = to_old[:topk], to_new[:topk]
        terms = [pos, *to_old, *to_new]
        top = max(terms)
        total += top + math.log(sum(math.exp(v - top) for v in terms)) - pos
    return total / len(zn)


# --- a fake Context and a captured trainer step ---------------------------------------------------


class LinearOld(nn.Module):
    """A frozen 'old model': a fixed linear map of the flattened image."""

    def __init__(self, pixels: int, d: int = D) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(d, pixels, generator=g) / pixels**0.5)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def fake_trained(digest: str, spec, **more) -> SimpleNamespace:
    return SimpleNamespace(digest=digest, spec=spec, name=digest, **more)


class FakeContext:
    """What a method sees of a Context, with fixed old-model embeddings and classifier, and a
    record of what it asked to train (``asked``)."""

    def __init__(self, pixels: int, in_chans: int) -> None:
        g = torch.Generator().manual_seed(2)
        self.scenario = SCENARIO
        self.device = torch.device("cpu")
        self.seed = 0
        self.old_w = torch.randn(10, D, generator=g)  # the frozen old classifier, classes 0-9
        self.feats = torch.randn(60, D, generator=g)  # old embeddings of the new training set
        self.labels = torch.arange(60) % 20
        self.old = fake_trained(
            "old-digest",
            SCENARIO.old,
            module=LinearOld(pixels).eval(),
            in_chans=in_chans,
            classifier_weight=lambda: self.old_w,
        )
        self.new_w = torch.randn(20, D, generator=g)
        self.new = fake_trained("new-digest", SCENARIO.new, classifier_weight=lambda: self.new_w)
        self.side = fake_trained("side-digest", SCENARIO.side)
        self.asked: dict = {}

    def old_model(self):
        return self.old

    def side_model(self):
        return self.side

    def embed(self, model, role, view=0):
        return self.feats[:, : model.spec.embedding_dim], self.labels

    def new_model(self, extra=None, tag=None):
        if extra is None:
            return self.new
        self.asked["extra"] = extra
        return fake_trained("own-new", SCENARIO.new)

    def transformation(self, new, use_side, name="h", extra_key=None, module=None, loss=None):
        self.asked.update(use_side=use_side, module=module, loss=loss, new=new)
        return fake_trained("h", SCENARIO.transformation, module=module)


@pytest.fixture
def session(tmp_path) -> Session:
    return Session(Cache(tmp_path / "cache"))


def backbone_step(monkeypatch, session: Session, extra, ctx):
    """(model, step) of the new model's training with ``extra``, as fct.builders makes them."""
    got = {}

    def capture(session, model, spec, augment, e, step, views=1):
        got.update(model=model, step=step)
        raise Captured

    monkeypatch.setattr(builders, "fit_on_images", capture)
    monkeypatch.setattr(builders, "load_or_train", lambda s, entry, module, fit, spec: fit(entry))
    with pytest.raises(Captured):
        builders.train_backbone(session, SCENARIO.new, None, extra, ctx)
    return got["model"].eval(), got["step"]


def fixed_batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, model.in_chans, 16, 16, generator=g)
    y = torch.arange(24) % 20  # old classes 0-9 and new classes 10-19
    return x, y


def main_loss(model, x, y) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        emb, logits = model(x)
    return emb, mean_smoothed_ce(logits, y, SMOOTHING)


def fit_method(name: str, ctx: FakeContext, **settings):
    method_cls = METHODS.get(name)
    method = method_cls(method_cls.Settings(**settings)) if settings else method_cls()
    return method.fit(ctx)


# --- backbones: Independent, BCT, RACT, L2-BCT ------------------------------------------------------


def test_independent_trains_on_the_main_loss_alone(monkeypatch, session):
    ctx = FakeContext(16 * 16, 1)
    dep = fit_method("independent", ctx)
    assert "extra" not in ctx.asked and dep.query_model is ctx.new
    model, step = backbone_step(monkeypatch, session, None, ctx)
    x, y = fixed_batch(model)
    _, expected = main_loss(model, x, y)
    assert step((x, y), model).item() == pytest.approx(expected, rel=1e-5)


def bct_rows(ctx: FakeContext) -> list[list[float]]:
    """BCT's old classifier extended to 20 classes: the old rows, then per new class the mean
    old embedding of its training items (Shen et al. 2020)."""
    rows = ctx.old_w.double().tolist()
    for c in range(10, 20):
        items = [f for f, lab in zip(ctx.feats.double().tolist(), ctx.labels) if lab == c]
        rows.append([sum(col) / len(items) for col in zip(*items)])
    return rows


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_bct_adds_the_weighted_influence_loss(monkeypatch, session, weight):
    model = builders.build_model(session, SCENARIO.new, 20)
    ctx = FakeContext(16 * 16, model.in_chans)
    fit_method("bct", ctx, **({"weight": weight} if weight != 1.0 else {}))
    extra = ctx.asked["extra"]  # BCT trains its own new model with a term
    model, step = backbone_step(monkeypatch, session, extra, ctx)
    x, y = fixed_batch(model)
    emb, main = main_loss(model, x, y)
    rows = bct_rows(ctx)
    logits = [[dot(e, r) for r in rows] for e in emb.double().tolist()]
    influence = sum(smoothed_ce(row, int(t), SMOOTHING) for row, t in zip(logits, y)) / len(y)
    got = step((x, y), model).item()
    assert got == pytest.approx(main + weight * influence, rel=1e-5)
    assert influence > 0.1 * main  # the term is large enough for a sign flip to show


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_l2_bct_adds_the_weighted_regression_term(monkeypatch, session, weight):
    model = builders.build_model(session, SCENARIO.new, 20)
    ctx = FakeContext(model.in_chans * 16 * 16, model.in_chans)
    fit_method("l2_bct", ctx, **({"weight": weight} if weight != 1.0 else {}))
    model, step = backbone_step(monkeypatch, session, ctx.asked["extra"], ctx)
    x, y = fixed_batch(model)
    emb, main = main_loss(model, x, y)
    with torch.no_grad():
        old = ctx.old.module.embed(x)
    term = l2_bct_term(emb, old)
    assert term > 1e-3
    assert step((x, y), model).item() == pytest.approx(main + weight * term, rel=1e-5)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_ract_adds_the_weighted_contrastive_term(monkeypatch, session, weight):
    model = builders.build_model(session, SCENARIO.new, 20)
    ctx = FakeContext(model.in_chans * 16 * 16, model.in_chans)
    dep = fit_method("ract", ctx, **({"weight": weight} if weight != 1.0 else {}))
    assert dep.backfill_order_name == "uncertainty" and len(dep.backfill_order) == 60
    model, step = backbone_step(monkeypatch, session, ctx.asked["extra"], ctx)
    x, y = fixed_batch(model)
    emb, main = main_loss(model, x, y)
    with torch.no_grad():
        old = ctx.old.module.embed(x)
    term = ract_term(emb, old, y)
    assert step((x, y), model).item() == pytest.approx(main + weight * term, rel=1e-5)


def test_the_trainers_gradient_follows_the_extra_term(monkeypatch, session):
    """The term reaches the weights with the sign that lowers it: one SGD step on the total
    loss lowers BCT's influence term (a term added with the wrong sign raises it)."""
    model = builders.build_model(session, SCENARIO.new, 20)
    ctx = FakeContext(16 * 16, model.in_chans)
    fit_method("bct", ctx, weight=50.0)  # the term dominates the step
    extra = ctx.asked["extra"]
    model, step = backbone_step(monkeypatch, session, extra, ctx)
    x, y = fixed_batch(model)

    def influence() -> float:
        with torch.no_grad():
            emb, logits = model(x)
            return extra(builders.Batch(emb, logits, y, x)).item()

    before = influence()
    step((x, y), model).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
    assert influence() < before


# --- h: FCT, FCT + side-information, FastFill -------------------------------------------------------


def h_step(monkeypatch, session, ctx, use_side, module=None, loss=None):
    """(h, step) of the transformation's training, as fct.builders makes them."""
    got = {}

    def capture(model, step, *args, **kwargs):
        got.update(model=model, step=step)
        raise Captured

    import fct.h_data

    monkeypatch.setattr(builders, "train", capture)
    monkeypatch.setattr(fct.h_data, "h_batches", lambda *a: (None, 1))
    monkeypatch.setattr(builders, "load_or_train", lambda s, entry, module, fit, spec: fit(entry))
    models = (ctx.old, ctx.new, ctx.side if use_side else None)
    with pytest.raises(Captured):
        builders.train_transformation(
            session, ctx, SCENARIO.transformation, models, module=module, loss=loss
        )
    return got["model"].eval(), got["step"]


def h_batch(d_side: int):
    g = torch.Generator().manual_seed(4)
    o = torch.randn(16, D, generator=g)
    s = torch.randn(16, d_side, generator=g) if d_side else None
    t = torch.randn(16, D, generator=g)
    return o, s, t, torch.arange(16) % 20


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    p, t = pred.double().flatten().tolist(), target.double().flatten().tolist()
    return sum((a - b) ** 2 for a, b in zip(p, t)) / len(p)


@pytest.mark.parametrize("name", ["fct", "fct_side"])
def test_fct_fits_h_on_the_mse_with_its_side_information(monkeypatch, session, name):
    ctx = FakeContext(16 * 16, 1)
    use_side = name == "fct_side"
    dep = fit_method(name, ctx)
    assert ctx.asked["use_side"] is use_side and dep.uses_side is use_side
    assert ctx.asked["loss"] is None and ctx.asked["new"] is ctx.new  # FCT's own MSE, shared new
    h, step = h_step(monkeypatch, session, ctx, use_side)
    o, s, t, labels = h_batch(SCENARIO.side.embedding_dim if use_side else 0)
    with torch.no_grad():
        pred = h(o, s)
        got = step((o, s, t, labels), h).item()
    assert got == pytest.approx(mse(pred, t), rel=1e-5)
    if use_side:  # the side embeddings reach h: other side features, another loss
        with torch.no_grad():
            other = step((o, torch.zeros_like(s), t, labels), h).item()
        assert other != pytest.approx(got, rel=1e-4)


def fastfill_expected(module, o, s, t, labels, weight, smoothing=0.1) -> float:
    """FastFill (Jaeckle et al. 2023): per item L_i = mean_j (h_ij - t_ij)^2 + smoothed CE of
    the frozen new classifier on h(old)_i; loss = mean_i(0.5 exp(-sigma_i) L_i + 0.5 sigma_i)."""
    with torch.no_grad():
        pred, sigma = module.with_sigma(o, s)
    total = 0.0
    rows = pred.double().tolist()
    for i, (p, tt) in enumerate(zip(rows, t.double().tolist())):
        item = sum((a - b) ** 2 for a, b in zip(p, tt)) / len(p)
        logits = [dot(p, w) for w in weight.double().tolist()]
        item += smoothed_ce(logits, int(labels[i]), smoothing)
        sg = float(sigma[i])
        total += 0.5 * math.exp(-sg) * item + 0.5 * sg
    return total / len(rows)


@pytest.mark.parametrize("name", ["fastfill", "fastfill_side"])
def test_fastfill_fits_h_with_its_classification_and_uncertainty_terms(monkeypatch, session, name):
    ctx = FakeContext(16 * 16, 1)
    use_side = name == "fastfill_side"
    dep = fit_method(name, ctx)
    module, loss = ctx.asked["module"], ctx.asked["loss"]
    assert ctx.asked["use_side"] is use_side and dep.uses_side is use_side
    assert dep.backfill_order_name == "uncertainty"
    h, step = h_step(monkeypatch, session, ctx, use_side, module=module, loss=loss)
    assert h is module
    o, s, t, labels = h_batch(SCENARIO.side.embedding_dim if use_side else 0)
    with torch.no_grad():
        got = step((o, s, t, labels), h).item()
    expected = fastfill_expected(module, o, s, t, labels, ctx.new_w)
    assert got == pytest.approx(expected, rel=1e-5)
    # Each part weighs: without the classification term, or with sigma = 0, it would differ.
    with torch.no_grad():
        pred, sigma = module.with_sigma(o, s)
    assert sigma.abs().max() > 1e-3 and mse(pred, t) < 0.9 * expected
