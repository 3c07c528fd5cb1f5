"""Score fusion: the original service's ``0.7*ITM + 0.3*cosine``, weights from settings."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def fuse(itm: NDArray[np.float32], cosine: NDArray[np.float32], itm_weight: float = 0.7,
         cosine_weight: float = 0.3) -> NDArray[np.float32]:
    return (itm_weight * np.asarray(itm, np.float32) + cosine_weight * np.asarray(cosine, np.float32)).astype(
        np.float32)


def rank(scores: NDArray[np.float32]) -> NDArray[np.int64]:
    """Indices by descending score; ties keep their input (ANN) order."""
    return np.argsort(-np.asarray(scores), kind="stable")
