"""Filter values checked by type for each operator, as Pinecone's filter language takes them: what Pinecone
would refuse as a bad request is refused here (the API answers 422), and what it takes passes."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import filters
from pipeline.errors import InvalidRequest


@pytest.mark.parametrize(("flt", "why"), [
    ({"a": {"$in": [True]}}, "list of strings or numbers"), ({"a": {"$nin": [None]}}, "list of strings or numbers"),
    ({"a": {"$in": "memes"}}, "list of strings or numbers"), ({"a": {"$in": [["x"]]}}, "list of strings or numbers"),
    ({"a": {"$eq": [1]}}, "a string, a number or a boolean"), ({"a": {"$ne": None}}, "a string, a number or a boolean"),
    ({"a": {"$eq": {"$gt": 1}}}, "a string, a number or a boolean"), ({"a": None}, "or an object of operators"),
    ({"a": [1, 2]}, "or an object of operators"), ({"a": {"$gt": "2020"}}, "takes a number"),
    ({"a": {"$lte": True}}, "takes a number"), ({"a": {"$gte": float("nan")}}, "takes a number"),
    ({"a": {"$lt": float("inf")}}, "takes a number"), ({"a": {"$eq": 2 ** 60}}, r"2\^53"), ({"a": {}}, "is empty"),
    ({"a": {"$exists": True}}, "unknown filter operator"), ({"$not": {"a": 1}}, "unknown filter operator"),
    ({"subreddit": ["memes", {"x": 1}]}, "list of strings or numbers"), ({"created_after": float("nan")}, "a number"),
    ({"min_post_score": "900"}, "a number"),
])
def test_a_value_the_operator_does_not_take_is_refused(flt: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        filters.for_search(flt)


@pytest.mark.parametrize("flt", [
    {"a": "memes"}, {"a": 1.5}, {"a": True}, {"a": {"$ne": False}}, {"a": {"$in": ["x", 2]}}, {"a": {"$nin": []}},
    {"a": {"$gt": 0, "$lte": 2 ** 53}}, {"$or": [{"a": "x"}, {"b": {"$lt": -1.5}}]}, {"subreddit": ["memes", "me_irl"]},
])
def test_what_pinecone_takes_passes(flt: dict[str, Any]) -> None:
    assert filters.for_search(flt) is not None


@pytest.mark.contract
@pytest.mark.parametrize("flt", [
    {"a": {"$in": [True]}}, {"a": {"$eq": [1]}}, {"a": {"$gt": "2020"}}, {"a": None}, {"a": {}},
    {"$or": [{"a": {"$nin": [{"x": 1}]}}]}, {"a": {"$in": ["x", 2]}}, {"a": True}, {"a": {"$gte": 1.5}},
])
def test_the_validator_and_pinecone_agree_and_a_refusal_is_the_callers(pinecone_standin, flt: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """What the validator refuses, the Pinecone stand-in refuses with 400 (through the real client), and the
    adapter reports that as the caller's error (Rejected), not as the store failing; what it takes, the store
    takes too."""
    import numpy as np

    from pipeline.errors import Rejected, Unavailable
    from pipeline.stores.pinecone_store import PineconeVectorStore

    store = PineconeVectorStore(pinecone_standin.api_key, host=pinecone_standin.host, timeout=5, retries=0)
    store.upsert([("p1", np.ones(4, np.float32), {"a": 1})], namespace="filters")
    try:
        filters.validate(flt)
        refused = False
    except InvalidRequest:
        refused = True
    if refused:
        with pytest.raises(Rejected) as caught:
            store.query(np.ones(4, np.float32), 3, filter=flt, namespace="filters")
        assert caught.value.code == "vector_store_rejected" and "HTTP 400" in caught.value.message
        assert not isinstance(caught.value, Unavailable)
    else:
        store.query(np.ones(4, np.float32), 3, filter=flt, namespace="filters")
