"""The spec of a scenario on stored embeddings (``embeddings = { ... }`` in a suite file):
``EmbeddingsSpec`` and its parsing. Split from fct.scenarios, which imports both; the files
themselves are read by fct.precomputed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fct.errors import FCTError
from fct.suite_checks import _check_keys

if TYPE_CHECKING:
    from fct.scenarios import ModelSpec


@dataclass(frozen=True)
class EmbeddingsSpec:
    """Stored embeddings instead of images (fct.precomputed): a training set (h and the
    adapters are fitted on it) and an evaluation set (``eval``: queries and gallery,
    leave-one-out) or a query set and a gallery set (``query``, ``gallery``). The paths as
    the suite wrote them; ``root`` the suite file's folder they are relative to (not part of
    any hash: moving the folder reruns nothing)."""

    train: str
    eval: str | None = None
    query: str | None = None
    gallery: str | None = None
    root: str = field(default=".", compare=False)

    def splits(self) -> tuple[str, ...]:
        """The sets given: ``train`` and ``eval``, or ``train``, ``query`` and ``gallery``."""
        return ("train", "eval") if self.eval is not None else ("train", "query", "gallery")

    def path(self, which: str) -> Path:
        """The absolute path of ``train``, ``eval``, ``query`` or ``gallery``."""
        return Path(self.root) / getattr(self, which)

    def paths(self) -> dict[str, Path]:
        """Every set's absolute path, by split."""
        return {w: self.path(w) for w in self.splits()}

    def as_dict(self) -> dict[str, Any]:
        """The paths and the sha256 of their contents (streamed once per process): a record
        made from other files is rerun."""
        from fct.precomputed import file_digest

        return {
            **{w: getattr(self, w) for w in self.splits()},
            "digests": {w: file_digest(self.path(w)) for w in self.splits()},
        }


def stored_embeddings(
    table: Any, path: Path, specs: dict[str, ModelSpec], where: str
) -> tuple[EmbeddingsSpec, dict[str, ModelSpec | None]]:
    """The scenario's ``embeddings = { train = ..., eval = ... }`` (paths relative to the
    suite file) and its model specs with the files' embedding sizes (read from the headers;
    the values are checked before the run, fct.runner.check_scenario)."""
    from fct.precomputed import header_dims

    if not isinstance(table, dict):
        raise FCTError(
            f'{where}: embeddings must be a table, e.g. {{ train = "train.npz", eval = "eval.npz" }}'
        )
    _check_keys(table, {"train", "eval", "query", "gallery"}, f"{where} [embeddings]")
    split = "query" in table or "gallery" in table
    if split == ("eval" in table) or (split and not {"query", "gallery"} <= set(table)):
        raise FCTError(
            f"{where} [embeddings]: give train and either eval (one set, leave-one-out) or "
            "query and gallery"
        )
    for key in table:
        if not isinstance(table[key], str) or not table[key]:
            raise FCTError(
                f"{where} [embeddings]: '{key}' must name an .npz file or a folder of .npy files"
            )
    if "train" not in table:
        raise FCTError(f"{where} [embeddings]: 'train' is required (what the maps are fitted on)")
    spec = EmbeddingsSpec(**table, root=str(Path(path).resolve().parent))
    dims = header_dims(spec.path("train"))
    out: dict[str, ModelSpec | None] = {
        role: dataclasses.replace(specs[role], embedding_dim=dims[role]) for role in ("old", "new")
    }
    out["side"] = (
        None
        if dims["side"] is None
        else dataclasses.replace(specs["side"], embedding_dim=dims["side"])
    )
    return spec, out
