"""Compatibility of a sequence of model updates, from its compatibility matrix.

``M[i][j]`` (``i >= j``, generations numbered from 0) is a retrieval metric of queries embedded
by model i against the gallery as stored when model j was current, brought to model i's space
the method's way (fct.sequence). Upper-triangle cells (``i < j``) are None: a gallery is never
searched by a model older than itself. The definitions follow CL2R (Biondi et al.,
"CL2R: Compatible Lifelong Learning Representations", ACM TOMM 2023, arXiv 2211.09032,
sec. "Evaluation metrics"); docs/metrics.md states the formulas.

Pure functions on lists of lists; nothing here sees a model.
"""

from __future__ import annotations

from typing import Any

from fct.errors import FCTError

Matrix = list[list[float | None]]


def check_matrix(matrix: Matrix) -> int:
    """The number of generations T of a lower-triangular matrix (T >= 2); FCTError otherwise."""
    n = len(matrix)
    if n < 2 or any(len(row) != n for row in matrix):
        raise FCTError(f"a compatibility matrix is square with 2 or more rows, got {n} rows")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if (value is None) != (j > i):
                where = "above" if j > i else "on or below"
                raise FCTError(
                    f"compatibility matrix cell [{i}][{j}] is {value!r}; cells {where} the "
                    "diagonal must be " + ("null" if j > i else "numbers")
                )
    return n


def criterion(matrix: Matrix) -> list[list[bool | None]]:
    """The empirical compatibility criterion of every pair i > j: ``M[i][j] > M[j][j]`` (the
    newer model searching the older gallery beats the older model on its own gallery;
    Shen et al., BCT, CVPR 2020); None on and above the diagonal."""
    n = check_matrix(matrix)
    return [[matrix[i][j] > matrix[j][j] if j < i else None for j in range(n)] for i in range(n)]


def average_compatibility(matrix: Matrix) -> float:
    """AC: the share of pairs i > j that meet the criterion, ``2 / (T (T-1)) * sum 1[...]``."""
    crit = criterion(matrix)
    hits = [c for row in crit for c in row if c is not None]
    return sum(hits) / len(hits)


def backward_compatibility(matrix: Matrix) -> float:
    """BC: the last model against every older gallery, minus that gallery's own model,
    averaged: ``1/(T-1) * sum_{j<T-1} (M[T-1][j] - M[j][j])``."""
    n = check_matrix(matrix)
    last = n - 1
    return sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last


def forward_compatibility(matrix: Matrix) -> float:
    """FC: every update's new model against the gallery of the model just before it, minus
    the new model on its own gallery, averaged: ``1/(T-1) * sum_{i>=1} (M[i][i-1] - M[i][i])``."""
    n = check_matrix(matrix)
    return sum(matrix[i][i - 1] - matrix[i][i] for i in range(1, n)) / (n - 1)


def lower_mean(matrix: Matrix) -> float:
    """The mean of the lower triangle, diagonal included (``i >= j``): CL2R's average
    multi-model accuracy, ``2 / (T (T+1)) * sum_{i>=j} M[i][j]``."""
    n = check_matrix(matrix)
    cells = [matrix[i][j] for i in range(n) for j in range(i + 1)]
    return sum(cells) / len(cells)


def summarize(matrix: Matrix) -> dict[str, Any]:
    """AC, BC, FC, the lower-triangle mean and the criterion of every pair, of one matrix."""
    return {
        "AC": average_compatibility(matrix),
        "BC": backward_compatibility(matrix),
        "FC": forward_compatibility(matrix),
        "mean": lower_mean(matrix),
        "compatible": criterion(matrix),
    }
