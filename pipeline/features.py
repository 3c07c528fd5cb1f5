"""A versioned, pickle-free byte format for stored arrays (BLIP vision features).

Layout: magic ``IMGF``, format version (u8), dtype code (u8), ndim (u8), pad (u8), ndim x u32 shape,
then the array's bytes in C order, little-endian.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import StoreError

MAGIC = b"IMGF"
VERSION = 1
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
_CODES = {v: k for k, v in _DTYPES.items()}


def encode(array: NDArray[Any], dtype: str = "float16") -> bytes:
    arr = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    code = _CODES[arr.dtype]
    header = MAGIC + struct.pack("<BBBx", VERSION, code, arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def decode(data: bytes) -> NDArray[Any]:
    """Parse bytes written by :func:`encode`; raise StoreError on anything malformed."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise StoreError("not a feature blob (bad magic)", code="corrupt_features")
    version, code, ndim = struct.unpack_from("<BBBx", data, 4)
    if version != VERSION or code not in _DTYPES or ndim > 8:
        raise StoreError(f"unsupported feature blob (version {version}, dtype {code})", code="corrupt_features")
    shape = struct.unpack_from(f"<{ndim}I", data, 8)
    offset = 8 + 4 * ndim
    dtype = _DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise StoreError(f"feature blob truncated: {len(data) - offset} bytes, expected {expected}",
                         code="corrupt_features")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)  # type: ignore[call-overload, no-any-return]
