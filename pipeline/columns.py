"""Metadata held as typed numpy columns, so a Pinecone-style filter over a million rows is a few vector
operations instead of a million JSON parses. Semantics equal ``pipeline.filters.matches`` (tested so)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

Mask = NDArray[np.bool_]


class _Column:
    """One field: a number part (float64 + presence), a string part (codes, -1 absent), a bool part (-1 absent)."""

    def __init__(self, n: int) -> None:
        self.num = np.full(n, np.nan)
        self.has_num = np.zeros(n, bool)
        self.codes = np.full(n, -1, np.int32)
        self.flag = np.full(n, -1, np.int8)
        self.vocab: dict[str, int] = {}

    def grow(self, n: int) -> None:
        extra = n - len(self.num)
        if extra > 0:
            self.num = np.concatenate([self.num, np.full(extra, np.nan)])
            self.has_num = np.concatenate([self.has_num, np.zeros(extra, bool)])
            self.codes = np.concatenate([self.codes, np.full(extra, -1, np.int32)])
            self.flag = np.concatenate([self.flag, np.full(extra, -1, np.int8)])

    def set(self, i: int, value: Any) -> None:
        if isinstance(value, bool):
            self.flag[i] = int(value)
        elif isinstance(value, (int, float)):
            self.num[i], self.has_num[i] = float(value), True
        elif isinstance(value, str):
            self.codes[i] = self.vocab.setdefault(value, len(self.vocab))
        # other types (lists, objects) are not filterable here: the field counts as absent

    def present(self) -> Mask:
        return self.has_num | (self.codes >= 0) | (self.flag >= 0)  # type: ignore[no-any-return]

    def eq(self, value: Any) -> Mask:
        if isinstance(value, bool):
            return self.flag == int(value)  # type: ignore[no-any-return]
        if isinstance(value, (int, float)):
            return self.has_num & (self.num == float(value))  # type: ignore[no-any-return]
        if isinstance(value, str):
            code = self.vocab.get(value)
            return self.codes == code if code is not None else np.zeros(len(self.codes), bool)  # type: ignore[no-any-return]
        return np.zeros(len(self.codes), bool)

    def compare(self, op: str, value: float) -> Mask:
        with np.errstate(invalid="ignore"):
            cmp = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}[op]
            return self.has_num & cmp(self.num, float(value))  # type: ignore[no-any-return]


class Columns:
    """Rows appended in label order; ``labels[i]`` is row i's vector-store label; ``alive`` marks deletions."""

    def __init__(self) -> None:
        self.labels = np.zeros(0, np.int64)
        self.alive = np.zeros(0, bool)
        self.cols: dict[str, _Column] = {}
        self.n = 0

    def append(self, labels: Sequence[int], metas: Sequence[Mapping[str, Any]]) -> None:
        start, self.n = self.n, self.n + len(labels)
        self.labels = np.concatenate([self.labels, np.asarray(labels, np.int64)])
        self.alive = np.concatenate([self.alive, np.ones(len(labels), bool)])
        for col in self.cols.values():
            col.grow(self.n)
        for i, meta in enumerate(metas, start):
            for key, value in meta.items():
                if key not in self.cols:
                    self.cols[key] = _Column(self.n)
                self.cols[key].set(i, value)

    def kill(self, labels: Sequence[int]) -> None:
        pos = np.searchsorted(self.labels, np.asarray(labels, np.int64))
        ok = pos < self.n
        pos = pos[ok]
        pos = pos[self.labels[pos] == np.asarray(labels, np.int64)[ok]]
        self.alive[pos] = False

    def mask(self, flt: Mapping[str, Any]) -> Mask:
        out = np.ones(self.n, bool)
        for key, cond in flt.items():
            if key == "$and":
                for sub in cond:
                    out &= self.mask(sub)
            elif key == "$or":
                any_ = np.zeros(self.n, bool)
                for sub in cond:
                    any_ |= self.mask(sub)
                out &= any_
            else:
                conds = cond if isinstance(cond, Mapping) else {"$eq": cond}
                col = self.cols.get(key) or _Column(self.n)
                for op, arg in conds.items():
                    out &= self._op(col, op, arg)
        return out

    def _op(self, col: _Column, op: str, arg: Any) -> Mask:
        if op == "$eq":
            return col.eq(arg)
        if op == "$ne":
            return ~col.eq(arg)
        if op in ("$in", "$nin"):
            hit = np.zeros(self.n, bool)
            for v in arg:
                hit |= col.eq(v)
            return hit if op == "$in" else ~hit
        return col.compare(op, arg)

    def select(self, flt: Mapping[str, Any]) -> NDArray[np.int64]:
        """Labels of the live rows that pass ``flt``."""
        return self.labels[self.mask(flt) & self.alive]  # type: ignore[no-any-return]
