"""Pinecone's metadata filter language (the operator subset both vector stores accept), evaluated in Python.

``{"subreddit": "memes"}`` is shorthand for ``{"subreddit": {"$eq": "memes"}}``; several keys at one level
are ANDed. A field that is missing matches only ``$ne`` and ``$nin``; a bool equals only a bool; range
operators match numbers only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import InvalidRequest


def _eq(a: Any, b: Any) -> bool:
    # a bool equals only a bool (Python would say True == 1)
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _num(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": _eq,
    "$ne": lambda a, b: not _eq(a, b),
    "$gt": lambda a, b: _num(a) and a > b,
    "$gte": lambda a, b: _num(a) and a >= b,
    "$lt": lambda a, b: _num(a) and a < b,
    "$lte": lambda a, b: _num(a) and a <= b,
    "$in": lambda a, b: any(_eq(a, x) for x in b),
    "$nin": lambda a, b: not any(_eq(a, x) for x in b),
}
OPERATORS = (*_COMPARE, "$and", "$or")


def validate(flt: Any) -> None:
    """Raise InvalidRequest naming the first thing wrong with a filter."""
    if not isinstance(flt, Mapping):
        raise InvalidRequest("a filter must be a JSON object")
    for key, value in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InvalidRequest(f"{key} takes a non-empty list of filters")
            for sub in value:
                validate(sub)
        elif key.startswith("$"):
            raise InvalidRequest(f"unknown filter operator {key!r}; valid: {', '.join(OPERATORS)}")
        elif isinstance(value, Mapping):
            for op, arg in value.items():
                if op not in _COMPARE:
                    raise InvalidRequest(f"unknown filter operator {op!r} on {key!r}; valid: {', '.join(_COMPARE)}")
                if op in ("$in", "$nin") and not isinstance(arg, list):
                    raise InvalidRequest(f"{op} on {key!r} takes a list")
                if op in ("$gt", "$gte", "$lt", "$lte") and (
                        isinstance(arg, bool) or not isinstance(arg, (int, float))):
                    raise InvalidRequest(f"{op} on {key!r} takes a number")


def matches(flt: Mapping[str, Any] | None, metadata: Mapping[str, Any]) -> bool:
    """Whether ``metadata`` passes ``flt`` (None passes everything)."""
    if not flt:
        return True
    for key, cond in flt.items():
        if key == "$and":
            if not all(matches(sub, metadata) for sub in cond):
                return False
        elif key == "$or":
            if not any(matches(sub, metadata) for sub in cond):
                return False
        else:
            conds = cond if isinstance(cond, Mapping) else {"$eq": cond}
            for op, arg in conds.items():
                if key not in metadata:
                    if op not in ("$ne", "$nin"):
                        return False
                    continue
                if not _COMPARE[op](metadata[key], arg):
                    return False
    return True
