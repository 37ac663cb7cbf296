"""The adapter family: a map between the old and the new embedding space, fitted on the
training set's paired embeddings (the same items embedded by both models), in either direction.

- ``direction = "gallery"``: the stored old embeddings are mapped into the new space (as FCT's
  h is), the new model's queries search the mapped gallery.
- ``direction = "query"`` (the default, Drift-Adapter's setting: Vejendla, "Drift-Adapter",
  EMNLP 2025): the new model's queries are mapped into the old space and search the untouched
  old gallery (zero backfill); each query pays the map's cost, measured in the record.

Maps (x: source embeddings [N, d_s], y: target embeddings [N, d_t], rows paired):

- ``procrustes``: orthogonal Procrustes (Schönemann 1966), y ≈ (x - μ_x) W + μ_y with
  W^T W = I minimising the squared error: W = U V^T from the SVD of (x - μ_x)^T (y - μ_y).
  When d_s ≠ d_t, W is the thin SVD's semi-orthogonal [d_s, d_t] map. That is exactly what
  zero-padding the smaller side to max(d_s, d_t) and solving the square problem gives,
  restricted to the real coordinates: the padding adds no free parameter and no learned
  projection, so the map stays norm-preserving (an isometry when d_s <= d_t, an orthogonal
  projection onto d_t directions otherwise).
- ``affine``: ridge-regularised least squares, y ≈ x A + b minimising
  mean ||x A + b - y||² + ridge ||A||_F² (the bias is not penalised).
- ``low_rank``: the affine map of rank ``rank``: reduced-rank ridge regression (Izenman 1975),
  the ridge solution A projected onto the top ``rank`` right singular vectors of its fitted
  values (x - μ_x) A.
- ``mlp_adapter``: a small residual MLP, y ≈ skip(x) + MLP(x) with MLP = Linear-ReLU-Linear
  (``hidden`` units) and skip the identity when d_s = d_t, else a linear map initialised
  from the affine fit; trained with Adam on the mean squared error for ``epochs`` epochs.

A fitted map is stored in the artifact cache (kind ``transformations``, see ``Adapter``), so a
rerun loads it, ``fct list transformations`` lists it and ``fct transform`` applies it (a
gallery-side one to a stored gallery; docs/transform.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, Settings, register_method
from fct.provenance import source_digest
from fct.session import Role, Trained

if TYPE_CHECKING:
    from fct.artifacts import Entry
    from fct.context import Context
    from fct.scenarios import Scenario

log = logging.getLogger(__name__)

Direction = Literal["query", "gallery"]


@dataclass(frozen=True)
class AdapterSettings(Settings):
    """Every adapter's settings: which way it maps (Drift-Adapter's default: queries)."""

    direction: Direction = "query"


def _source_target(ctx: Context, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) training embeddings of the map, float64 on the CPU: (new, old) for
    the query direction, (old, new) for the gallery direction; the transformation's
    training data (``[transformation] train_on``), the same items embedded by both models."""
    data = Role.training(ctx.scenario.transformation.train_on)
    old, _ = ctx.embed(ctx.old_model(), data)
    new, _ = ctx.embed(ctx.new_model(), data)
    if len(old) != len(new):
        raise FCTError(
            f"the old and new training embeddings hold {len(old)} and {len(new)} rows; an "
            "adapter needs the same items embedded by both models"
        )
    x, y = (new, old) if direction == "query" else (old, new)
    return x.double(), y.double()


class LinearMap(nn.Module):
    """``x -> x @ weight + bias`` in float32: a fitted closed-form map ``(x - shift) W + b``
    stored folded, ``bias = b - shift W`` (one GEMM per batch).

    ``LinearMap(d_in, d_out)`` is the empty map of those sizes (what a cached map is loaded
    into); ``LinearMap.fitted(W, b, shift)`` the map a fit returns."""

    kind = "linear"

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(d_in, d_out))
        self.register_buffer("bias", torch.zeros(d_out))

    @classmethod
    def fitted(cls, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor) -> LinearMap:
        """The folded map of ``(x - shift) @ weight + bias`` (folded in the fit's precision)."""
        m = cls(*weight.shape)
        m.weight.copy_(weight.float())
        m.bias.copy_((bias - shift @ weight).float())
        return m

    def config(self) -> dict:
        """Its sizes: what ``build_map`` needs to make an empty one."""
        return {"d_in": int(self.weight.shape[0]), "d_out": int(self.weight.shape[1])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.float(), self.weight)


def procrustes(x: torch.Tensor, y: torch.Tensor, center: bool = True) -> LinearMap:
    """Orthogonal (or semi-orthogonal) Procrustes map from x to y; see the module docstring."""
    mx = x.mean(0) if center else torch.zeros(x.shape[1], dtype=x.dtype)
    my = y.mean(0) if center else torch.zeros(y.shape[1], dtype=y.dtype)
    u, _, vh = torch.linalg.svd((x - mx).T @ (y - my), full_matrices=False)
    return LinearMap.fitted(u @ vh, my, mx)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
    """(A, μ_x, μ_y) of mean ||(x - μ_x) A - (y - μ_y)||² + lam ||A||² (float64)."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n = len(x)
    gram = xc.T @ xc / n + lam * torch.eye(x.shape[1], dtype=x.dtype)
    a = torch.linalg.solve(gram, xc.T @ yc / n)
    return a, mx, my


def affine(x: torch.Tensor, y: torch.Tensor, lam: float) -> LinearMap:
    """Ridge-regularised affine least squares from x to y."""
    a, mx, my = ridge(x, y, lam)
    return LinearMap.fitted(a, my, mx)


def low_rank(x: torch.Tensor, y: torch.Tensor, lam: float, rank: int) -> LinearMap:
    """Reduced-rank ridge regression: the ridge map projected onto the top ``rank`` right
    singular vectors of its fitted values."""
    a, mx, my = ridge(x, y, lam)
    _, _, vh = torch.linalg.svd((x - mx) @ a, full_matrices=False)
    v = vh[:rank].T
    return LinearMap.fitted(a @ v @ v.T, my, mx)


class ResidualMLP(nn.Module):
    """skip(x) + Linear-ReLU-Linear(x); skip is the identity for equal sizes.

    Building one draws the hidden layer's initial weights from torch's global stream (the
    fit's draws); ``build_map`` builds the empty module a cached map is loaded into without
    touching the caller's stream."""

    kind = "residual_mlp"

    def __init__(self, d_in: int, d_out: int, hidden: int, skip: LinearMap | None) -> None:
        super().__init__()
        self.skip = skip
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
        nn.init.zeros_(self.mlp[2].weight)  # starts as the skip map alone
        nn.init.zeros_(self.mlp[2].bias)

    def config(self) -> dict:
        """Its sizes and whether it has a linear skip map: what ``build_map`` needs."""
        first, last = self.mlp[0], self.mlp[2]
        return {
            "d_in": int(first.in_features),
            "d_out": int(last.out_features),
            "hidden": int(first.out_features),
            "skip": self.skip is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x if self.skip is None else self.skip(x)) + self.mlp(x)


#: The maps an adapter fits, by the kind their files and cache entries name (the kinds
#: ``fct transform`` applies: fct.transform_models.LOADERS).
MAPS: dict[str, type[nn.Module]] = {LinearMap.kind: LinearMap, ResidualMLP.kind: ResidualMLP}


def map_config(module: nn.Module) -> tuple[str, dict]:
    """(kind, config) of a fitted map: what rebuilds it empty (``build_map``)."""
    kind = getattr(module, "kind", None)
    if MAPS.get(kind) is not type(module):
        raise FCTError(
            f"an adapter's fit_map returned a {type(module).__name__}; return a LinearMap or a "
            "ResidualMLP (fct.methods.adapters), the maps that are cached and fct transform applies"
        )
    return kind, module.config()


def build_map(kind: str, config: dict) -> nn.Module:
    """The empty map of ``kind`` with ``config``'s sizes (sizes checked by the caller); the
    caller's torch random stream is left as it was."""
    if kind == LinearMap.kind:
        return LinearMap(config["d_in"], config["d_out"])
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws initial weights
        skip = LinearMap(config["d_in"], config["d_out"]) if config["skip"] else None
        return ResidualMLP(config["d_in"], config["d_out"], config["hidden"], skip)


# --- the methods -------------------------------------------------------------------------------


class Adapter(Method):
    """Base of the adapters: fit a map on the training embeddings, deploy it one way.

    The fitted map is a cache entry of kind ``transformations`` (``RUN_NAME-NEWMODEL-DIGEST``,
    listed by ``fct list transformations`` and applied by ``fct transform``): a rerun loads it
    instead of fitting again. Its key is ``cache_key``; its meta holds the fit's seconds and
    rows and the map's kind and config (the ``fct.config`` of fct.transform_models' files)."""

    keeps_new_model = True
    Settings = AdapterSettings

    def fit_map(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        raise NotImplementedError

    def cache_key(self, ctx: Context, old: Trained, new: Trained) -> dict:
        """What determines the fitted map: the adapter (its registered and run names, its
        settings but the label, so its direction too), its training data (the two models'
        digests and ``train_on``), the run's seed (the MLP's draws) and the source of this
        file and of the adapter's class (editing either refits)."""
        return {
            "adapter": type(self).name,
            "run_name": self.run_name,
            "settings": self.settings.hashed(),
            "direction": self.settings.direction,
            "train_on": ctx.scenario.transformation.train_on,
            "old": old.digest,
            "new": new.digest,
            "seed": ctx.seed,
            "source": [source_digest(Adapter), source_digest(type(self))],
            "format": 1,
        }

    def fitted_map(self, ctx: Context, old: Trained, new: Trained) -> Trained:
        """The map fitted on the training embeddings, or loaded from its cache entry."""
        session, direction = ctx.session, self.settings.direction
        entry = session.entry(
            "transformations", f"{self.run_name}-{new.name}", self.cache_key(ctx, old, new)
        )
        fitted: dict[str, nn.Module] = {}

        def build(e: Entry) -> tuple[dict[str, torch.Tensor], dict]:
            x, y = _source_target(ctx, direction)
            what = f"{self.run_name} ({direction} side) on {len(x)} training pairs"
            log.info("fitting %s -> %s/%s (cache %s)", what, e.kind, e.name, e.path)
            t0 = time.perf_counter()
            module = self.fit_map(x, y).eval()
            seconds = time.perf_counter() - t0
            kind, config = map_config(module)
            config = {**config, "direction": direction, "method": self.run_name}
            fitted["module"] = module
            meta = {"train_seconds": seconds, "fit_rows": len(x)}
            return module.state_dict(), {**meta, "map": {"kind": kind, "config": config}}

        force = session.claim_force(entry.digest)
        tensors, meta, built = session.cache.get_or_build(entry, build, force=force)
        if built:
            module = fitted["module"]
        else:
            spec = meta["map"]
            module = build_map(spec["kind"], spec["config"])
            module.load_state_dict(tensors, strict=True)
            log.info("loaded %s/%s from the cache", entry.kind, entry.name)
        module.eval()
        return Trained(module, entry, float(meta["train_seconds"]), meta, built)

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        direction = self.settings.direction
        old, new = ctx.old_model(), ctx.new_model()
        fitted = self.fitted_map(ctx, old, new)
        module = fitted.module

        @torch.inference_mode()
        def apply(z: torch.Tensor, _side: torch.Tensor | None = None) -> torch.Tensor:
            return module(z)

        notes = {"direction": direction, "fit_rows": int(fitted.spec["fit_rows"])}
        common = {
            "query_model": new,
            "artifacts": (old, new, fitted),
            "notes": notes,
            # The fit's own seconds, measured when it ran (stored in the entry's meta).
            "fit_seconds": fitted.train_seconds,
        }
        if direction == "query":
            return Deployment(query_update=apply, **common)
        return Deployment(gallery_update=apply, **common)


@register_method("procrustes")
class Procrustes(Adapter):
    """Orthogonal Procrustes map (semi-orthogonal when the sizes differ)."""

    label = "Procrustes"
    report_order = 90

    def fit_map(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        return procrustes(x, y)


@dataclass(frozen=True)
class AffineSettings(AdapterSettings):
    """The ridge penalty on the map's weights (the fit's mean squared error is per item)."""

    ridge: float = 1e-3

    def validate(self) -> None:
        """ridge >= 0."""
        if not self.ridge >= 0:
            raise FCTError(f"setting 'ridge' must be >= 0, got {self.ridge}")


@register_method("affine")
class Affine(Adapter):
    """Ridge-regularised affine least squares."""

    label = "Affine"
    report_order = 91
    Settings = AffineSettings

    def fit_map(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        return affine(x, y, self.settings.ridge)


@dataclass(frozen=True)
class LowRankSettings(AffineSettings):
    """The map's rank (at most the smaller embedding size) and the ridge penalty."""

    rank: int = 32

    def validate(self) -> None:
        """ridge >= 0 and rank >= 1."""
        super().validate()
        if self.rank < 1:
            raise FCTError(f"setting 'rank' must be >= 1, got {self.rank}")


@register_method("low_rank")
class LowRank(Adapter):
    """Affine map of rank r (reduced-rank ridge regression)."""

    label = "Low-rank affine"
    report_order = 92
    Settings = LowRankSettings

    def check(self, scenario: Scenario) -> None:
        """The rank fits the embedding sizes."""
        most = min(scenario.old.embedding_dim, scenario.new.embedding_dim)
        if self.settings.rank > most:
            raise FCTError(
                f"setting 'rank' is {self.settings.rank} but the embeddings are "
                f"{scenario.old.embedding_dim}-d and {scenario.new.embedding_dim}-d; set rank <= {most}"
            )

    def fit_map(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        return low_rank(x, y, self.settings.ridge, self.settings.rank)


@dataclass(frozen=True)
class MLPSettings(AdapterSettings):
    """The residual MLP's width and its Adam fit (full passes over the training set)."""

    hidden: int = 512
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0

    def validate(self) -> None:
        """Positive sizes and learning rate, weight_decay >= 0."""
        for key in ("hidden", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise FCTError(f"setting '{key}' must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise FCTError(f"setting 'lr' must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise FCTError(f"setting 'weight_decay' must be >= 0, got {self.weight_decay}")


@register_method("mlp_adapter")
class MLPAdapter(Adapter):
    """A residual MLP trained with Adam on the squared error (a short loop, CPU-sized)."""

    label = "Residual MLP adapter"
    report_order = 93
    Settings = MLPSettings

    def fit_map(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        st = self.settings
        skip = None if x.shape[1] == y.shape[1] else affine(x, y, 1e-3)
        # Seeded by the runner per (method, seed): the same draws on every rerun.
        model = ResidualMLP(x.shape[1], y.shape[1], st.hidden, skip)
        opt = torch.optim.Adam(model.mlp.parameters(), lr=st.lr, weight_decay=st.weight_decay)
        xf, yf = x.float(), y.float()
        n = len(xf)
        bs = min(st.batch_size, n)
        model.train()
        for _ in range(st.epochs):
            perm = torch.randperm(n)
            for i in range(0, n - bs + 1, bs):
                idx = perm[i : i + bs]
                loss = (model(xf[idx]) - yf[idx]).pow(2).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if not torch.isfinite(loss):
                    raise FCTError(
                        f"mlp_adapter: the loss became {loss.item()}; lower the setting 'lr'"
                    )
        return model.eval()
