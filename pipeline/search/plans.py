"""A plan per query kind: what differs between a text, a ``like`` and an ``image`` query, chosen once per query.

Every kind runs the same stages (encode -> retrieve -> fetch -> rerank -> fuse); a plan says how its query becomes
a vector (the SigLIP text tower, the post's stored vector, the SigLIP image tower), which stored features the
fetch stage adds (a ``like`` query's own post), what its candidates are reranked against, and how the scores are
fused: text by ``itm_weight * ITM + cosine_weight * cosine``; a picture or a post by the cosine of BLIP's ITC
image projections alone (ITM needs text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipeline.search.fusion import fuse
from pipeline.types import SearchParams, Vector

if TYPE_CHECKING:
    from pipeline.search.searcher import Searcher


@dataclass(frozen=True)
class Query:
    """One query as the Searcher got it: its params, its picture (an ``image`` query's) and its deadline."""

    params: SearchParams
    image: Image.Image | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class Scores:
    """The reranked candidates' scores, in their order: the fused score that ranks them, and its parts (``itm``
    None for a kind that has no ITM)."""

    fused: NDArray[np.float32]
    cosine: NDArray[np.float32]
    itm: NDArray[np.float32] | None = None

    def part(self, i: int) -> tuple[float, float | None, float]:
        """The ``i``-th candidate's (fused, itm, cosine)."""
        return float(self.fused[i]), None if self.itm is None else float(self.itm[i]), float(self.cosine[i])


class Plan:
    """The parts of a search that depend on the query's kind (``SearchParams.kind``)."""

    kind: ClassVar[str]

    def encode(self, s: Searcher, q: Query) -> Vector:
        raise NotImplementedError

    def wanted(self, q: Query, to_rerank: list[str]) -> list[str]:
        """The ids whose stored features the fetch stage reads."""
        return to_rerank

    def against(self, q: Query, feats: dict[str, NDArray[Any]]) -> Any:
        """What the candidates are reranked against (taken out of ``feats`` if it is there); None: nothing to
        compare, the ANN order stands."""
        raise NotImplementedError

    def score(self, s: Searcher, against: Any, feats: Sequence[NDArray[Any]]) -> Scores:
        raise NotImplementedError

    @staticmethod
    def none() -> Scores:
        """The scores of no candidate."""
        return Scores(np.zeros(0, np.float32), np.zeros(0, np.float32))


class TextPlan(Plan):
    kind = "text"

    def encode(self, s: Searcher, q: Query) -> Vector:
        return s.encode(q.params.query)

    def against(self, q: Query, feats: dict[str, NDArray[Any]]) -> Any:
        return q.params.query

    def score(self, s: Searcher, against: Any, feats: Sequence[NDArray[Any]]) -> Scores:
        itm, cosine = s.rerank(against, feats)
        return Scores(fuse(itm, cosine, s.settings.itm_weight, s.settings.cosine_weight), cosine, itm)


class _ByImage(Plan):
    """Reranked by image similarity: the fused score is the ITC cosine."""

    def score(self, s: Searcher, against: Any, feats: Sequence[NDArray[Any]]) -> Scores:
        cosine = s.rerank_image(against, feats)
        return Scores(cosine, cosine)


class LikePlan(_ByImage):
    """``like``: a stored post's vector is the query (no model runs); its stored features are the rerank query."""

    kind = "like"

    def encode(self, s: Searcher, q: Query) -> Vector:
        assert q.params.like is not None
        return s.lookup(q.params.like, q.params, q.deadline)

    def wanted(self, q: Query, to_rerank: list[str]) -> list[str]:
        return [*to_rerank, q.params.like] if to_rerank and q.params.like else to_rerank

    def against(self, q: Query, feats: dict[str, NDArray[Any]]) -> Any:
        return feats.pop(q.params.like, None) if q.params.like else None  # missing: nothing to compare


class ImagePlan(_ByImage):
    """``image``: a picture, encoded by the SigLIP image tower; its BLIP vision features are the rerank query."""

    kind = "image"

    def encode(self, s: Searcher, q: Query) -> Vector:
        assert q.image is not None
        return s.encode_image(q.image)

    def against(self, q: Query, feats: dict[str, NDArray[Any]]) -> Any:
        return q.image


PLANS: dict[str, Plan] = {p.kind: p for p in (TextPlan(), LikePlan(), ImagePlan())}


def plan_for(params: SearchParams) -> Plan:
    return PLANS[params.kind]
