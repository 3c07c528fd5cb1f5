"""Pinecone's metadata filter language (the operator subset both vector stores accept), evaluated in Python.

``{"subreddit": "memes"}`` is shorthand for ``{"subreddit": {"$eq": "memes"}}``; several keys at one level
are ANDed. A field that is missing matches only ``$ne`` and ``$nin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import InvalidRequest

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": lambda a, b: a == b,
    "$ne": lambda a, b: a != b,
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
    "$in": lambda a, b: a in b,
    "$nin": lambda a, b: a not in b,
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
                try:
                    if not _COMPARE[op](metadata[key], arg):
                        return False
                except TypeError:  # comparing a string field with a number: no match, as Pinecone
                    return False
    return True
