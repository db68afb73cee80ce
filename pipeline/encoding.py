"""How activations are stored: the element type of each layer array and the codecs that compress it.

Storage dtypes:

- ``float16`` (default): half precision, what the backbone produces under autocast anyway.
- ``bfloat16``: stored as the raw 16 bits (``uint16``; numpy and Zarr have no bfloat16), rounded to
  nearest even from float32. Same size as fp16, fp32's range, fewer mantissa bits.
- ``float32``: exact copies of the backbone's float32 output.
- ``int8``: lossy, symmetric per-token quantization: each row (token) ``x`` is stored as
  ``round(x / s)`` with ``s = max|x| / 127`` kept in a float32 side array. Half of fp16's size.

Decoding gives float16 for fp16 stores and float32 for every other dtype.

Every chunk of a format-3 store ends in a crc32c of its encoded bytes (Zarr v3's ``crc32c`` codec,
last in the chain), so a flipped bit fails the read that meets it instead of training on it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import LZ4

from pipeline.errors import UniptError

STORAGE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
}
CODECS = ("blosc-zstd", "blosc-lz4", "zstd", "lz4", "none")
SHUFFLES = {"byte": "shuffle", "bit": "bitshuffle", "none": "noshuffle"}

# zarr warns on every open of an array using numcodecs' LZ4 (not in the v3 spec). Choosing lz4 is
# deliberate and documented; repeating the warning per array and per read only buries real ones.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def has_scale(dtype: str) -> bool:
    return dtype == "int8"


def encode_rows(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Token rows ``[n, hidden]`` (float16/32) -> (stored array, per-row scale or None)."""
    if dtype == "float16":
        return rows.astype(np.float16, copy=False), None
    if dtype == "float32":
        return rows.astype(np.float32, copy=False), None
    values = np.ascontiguousarray(rows, dtype=np.float32)
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)  # round to nearest, ties to even
        return ((bits + rounding) >> 16).astype(np.uint16), None
    if dtype == "int8":
        scale = np.abs(values).max(axis=1) / 127.0 if len(values) else np.zeros(0, np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        quantized = np.clip(np.rint(values / safe[:, None]), -127, 127).astype(np.int8)
        return quantized, scale.astype(np.float32)
    raise UniptError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")


def decode_rows(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """The inverse of :func:`encode_rows` (exact for float16/float32, rounded for bfloat16/int8)."""
    if dtype in ("float16", "float32"):
        return stored
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        if scale is None:
            raise UniptError("an int8 cache layer is missing its per-token scales; the store is damaged")
        return stored.astype(np.float32) * scale[:, None]
    raise UniptError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")


def compressors(
    codec: str, shuffle: str, level: int, itemsize: int, blocksize: int = 0, checksum: bool = True
) -> list[Any]:
    """Zarr v3 bytes-to-bytes codecs for one array. ``blocksize`` (Blosc only; 0 = Blosc's choice).

    ``checksum`` appends the crc32c codec: last, so it covers the bytes exactly as stored and is the
    first thing checked on read, before a decompressor sees damaged input.
    """
    chain = _compressor(codec, shuffle, level, itemsize, blocksize)
    return [*chain, Crc32cCodec()] if checksum else chain


def offsets_compressors(checksum: bool = True) -> list[Any]:
    """The offsets arrays' codecs: Zarr's default (zstd level 0), plus crc32c."""
    return [ZstdCodec(level=0), Crc32cCodec()] if checksum else [ZstdCodec(level=0)]


def _compressor(codec: str, shuffle: str, level: int, itemsize: int, blocksize: int) -> list[Any]:
    if codec == "none":
        return []
    if codec == "zstd":
        return [ZstdCodec(level=level)]
    if codec == "lz4":
        return [LZ4(acceleration=1)]
    if codec in ("blosc-zstd", "blosc-lz4"):
        return [
            BloscCodec(
                cname=codec.split("-", 1)[1],
                clevel=level,
                shuffle=SHUFFLES[shuffle],
                typesize=itemsize,
                blocksize=blocksize,
            )
        ]
    raise UniptError(f"unknown codec {codec!r}; choose one of {list(CODECS)}")
