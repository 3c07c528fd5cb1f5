"""Pinecone's metadata filter language (the operator subset both vector stores accept), evaluated in Python.

``{"subreddit": "memes"}`` is shorthand for ``{"subreddit": {"$eq": "memes"}}``; several keys at one level
are ANDed. A field that is missing matches only ``$ne`` and ``$nin``; a bool equals only a bool; range
operators match numbers only.
"""

from __future__ import annotations

import math
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
MAX_DEPTH = 8  # $and / $or nested deeper than this is refused (no sane filter needs it; recursion is bounded)
MAX_VALUES = 1000  # values in one $in / $nin list


# what each operator takes, as Pinecone's filter language has it: a filter Pinecone would refuse is refused here,
# before a job is queued (the API answers 422), and never reaches a store as a request it would call malformed
_SCALAR = "a string, a number or a boolean"
_TAKES = {"$eq": _SCALAR, "$ne": _SCALAR, "$gt": "a number", "$gte": "a number", "$lt": "a number",
          "$lte": "a number", "$in": "a list of strings or numbers", "$nin": "a list of strings or numbers"}
MAX_INT = 2 ** 53  # Pinecone keeps numbers as 64-bit floats: a larger integer would not compare as written


def _number_ok(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) <= MAX_INT
    return isinstance(v, float) and math.isfinite(v)


def _value_ok(op: str, v: Any) -> bool:
    if op in ("$eq", "$ne"):
        return isinstance(v, (str, bool)) or _number_ok(v)
    if op in ("$in", "$nin"):
        return isinstance(v, list) and all(isinstance(x, str) or _number_ok(x) for x in v)
    return _number_ok(v)


def check_depth(flt: Any) -> None:
    """Refuse $and / $or nested past MAX_DEPTH before anything recurses into the filter: a loop, not a recursion,
    so a filter a thousand deep costs a few microseconds and never Python's stack (a RecursionError, a 500)."""
    todo = [(flt, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"$and / $or nested more than {MAX_DEPTH} deep")
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key in ("$and", "$or") and isinstance(value, list):
                    todo.extend((sub, depth + 1) for sub in value)


def validate(flt: Any, depth: int = 0) -> None:
    """Raise InvalidRequest naming the first thing wrong with a filter: an unknown operator, a value of a type
    the operator does not take, nesting past MAX_DEPTH, a list past MAX_VALUES."""
    if not isinstance(flt, Mapping):
        raise InvalidRequest("a filter must be a JSON object")
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"$and / $or nested more than {MAX_DEPTH} deep")
    for key, value in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InvalidRequest(f"{key} takes a non-empty list of filters")
            for sub in value:
                validate(sub, depth + 1)
        elif not isinstance(key, str) or not key or key.startswith("$"):
            raise InvalidRequest(f"unknown filter operator {key!r}; valid: {', '.join(OPERATORS)}")
        elif isinstance(value, Mapping):
            if not value:
                raise InvalidRequest(f"the condition on {key!r} is empty")
            for op, arg in value.items():
                if op not in _COMPARE:
                    raise InvalidRequest(f"unknown filter operator {op!r} on {key!r}; valid: {', '.join(_COMPARE)}")
                if op in ("$in", "$nin") and isinstance(arg, list) and len(arg) > MAX_VALUES:
                    raise InvalidRequest(f"{op} on {key!r} takes at most {MAX_VALUES} values")
                if not _value_ok(op, arg):
                    raise InvalidRequest(f"{op} on {key!r} takes {_TAKES[op]}" +
                                         (" (integers up to 2^53)" if isinstance(arg, int) and not isinstance(arg, bool)
                                          and op not in ("$in", "$nin") else ""))
        elif not _value_ok("$eq", value):  # the shorthand for $eq
            raise InvalidRequest(f"{key!r} takes {_SCALAR}, or an object of operators")


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


# The search API's shorthands, turned into the filter language: what users ask for most, by name.
SHORTHANDS = ("subreddit", "over_18", "created_after", "created_before", "min_post_score")


def _mentions(flt: Any, field: str) -> bool:
    if not isinstance(flt, Mapping):
        return False
    return any(k == field or (k in ("$and", "$or") and any(_mentions(s, field) for s in v)) for k, v in flt.items())


def for_search(flt: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A search's filter in the filter language. Shorthands: ``subreddit`` (a name or a list of names),
    ``over_18`` (true, false, or null for both), ``created_after`` / ``created_before`` (unix seconds, on
    ``created_utc``), ``min_post_score`` (on ``score``); anything else is taken as the filter language itself.
    NSFW posts are left out unless the filter says something about ``over_18``."""
    check_depth(flt)  # first: every walk below recurses
    rest = dict(flt or {})
    clauses: list[dict[str, Any]] = []
    sub = rest.get("subreddit")
    if isinstance(sub, (str, list)):
        rest.pop("subreddit")
        clauses.append({"subreddit": {"$in": sub} if isinstance(sub, list) else {"$eq": sub}})
    nsfw_said = "over_18" in rest or _mentions(rest, "over_18")
    if "over_18" in rest and (rest["over_18"] is None or isinstance(rest["over_18"], bool)):
        value = rest.pop("over_18")
        if value is not None:
            clauses.append({"over_18": {"$eq": value}})
    if not nsfw_said:
        clauses.append({"over_18": {"$ne": True}})  # a post without the field is kept
    for key, field, op in (("created_after", "created_utc", "$gte"), ("created_before", "created_utc", "$lt"),
                           ("min_post_score", "score", "$gte")):
        if key in rest:
            value = rest.pop(key)
            if not _number_ok(value):
                raise InvalidRequest(f"filter.{key} takes a number")
            clauses.append({field: {op: value}})
    if rest:
        clauses.append(rest)
    for clause in clauses:  # each at the depth the caller wrote it (the $and around them adds none)
        validate(clause)
    if not clauses:
        return None  # over_18: null and nothing else: everything
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
