"""Fidelity figures of model outputs: SQNR and cosine (the simulator's accumulator, one
definition for the project) and, for classifier-shaped outputs ([N, C] with C > 1), top-1
agreement."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..sim.run import Accumulator

__all__ = ["OutputFidelity", "rounded", "is_classifier"]


def rounded(x: float | None, digits: int = 6) -> float | None:
    """A JSON-safe, rounded figure (None for inf/nan): the report's bytes do not depend on
    the last float bits."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def is_classifier(value: np.ndarray) -> bool:
    return value.ndim == 2 and value.shape[1] > 1


class OutputFidelity:
    """Running fidelity of a set of outputs against their float values, over batches."""

    def __init__(self) -> None:
        self.acc: dict[str, Accumulator] = {}
        self.top1: dict[str, list[int]] = {}  # name -> [agreeing rows, rows]

    def add(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> None:
        for name, r in ref.items():
            g = got.get(name)
            if g is None:
                continue
            r, g = np.asarray(r), np.asarray(g)
            if r.dtype.kind != "f" or r.shape != g.shape:
                continue
            self.acc.setdefault(name, Accumulator()).add(r, g)
            if is_classifier(r):
                t = self.top1.setdefault(name, [0, 0])
                t[0] += int((r.argmax(axis=1) == g.argmax(axis=1)).sum())
                t[1] += r.shape[0]

    def result(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, acc in self.acc.items():
            f = acc.result()
            d: dict[str, Any] = {"sqnr_db": rounded(f.sqnr_db, 3), "cosine": rounded(f.cosine, 6)}
            if name in self.top1:
                agree, rows = self.top1[name]
                d["top1_agreement"] = rounded(agree / rows, 4) if rows else None
            out[name] = d
        return dict(sorted(out.items()))

    def score(self) -> float:
        """The worst output SQNR (dB): one number to rank by (inf when exact)."""
        vals = [a.result().sqnr_db for a in self.acc.values()]
        return min(vals) if vals else math.inf
