"""How activations are stored: the element type of each layer array and the codecs that compress it.

Storage dtypes:

- ``float16`` (default): half precision, what the backbone produces under autocast anyway.
- ``bfloat16``: stored as the raw 16 bits (``uint16``; numpy and Zarr have no bfloat16), rounded to
  nearest even from float32. Same size as fp16, fp32's range, fewer mantissa bits.
- ``float32``: exact copies of the backbone's float32 output.
- ``int8``: lossy, symmetric per-token quantization: each row (token) ``x`` is stored as
  ``round(x / s)`` with ``s = max|x| / 127`` kept in a float32 side array. Half of fp16's size.
- ``float8_e4m3``: lossy, torch's ``float8_e4m3fn`` (4 exponent bits, 3 mantissa bits, max 448) with the
  same per-token scale as int8 (``s = max|x| / 448``), stored as its raw 8 bits (``uint8``). Same size
  as int8; a relative (not absolute) error per value, so small activations keep more precision.

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

from unipt.pipeline.errors import UniptError

STORAGE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
    "int8": np.dtype(np.int8),
    "float8_e4m3": np.dtype(np.uint8),  # the raw bits of torch.float8_e4m3fn
}
FLOAT8_MAX = 448.0  # the largest finite float8_e4m3fn


def _float8_e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (decoding is one table lookup, no torch).

    Sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F/0xFF are NaN (no
    infinities: the "fn" format spends them on range).
    """
    bits = np.arange(256, dtype=np.uint32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent = ((bits >> 3) & 0xF).astype(np.int32)
    mantissa = (bits & 0x7).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * 2.0**-6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(bits & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


_FLOAT8_VALUES = _float8_e4m3_values()
CODECS = ("blosc-zstd", "blosc-lz4", "zstd", "lz4", "none")
SHUFFLES = {"byte": "shuffle", "bit": "bitshuffle", "none": "noshuffle"}

# zarr warns on every open of an array using numcodecs' LZ4 (not in the v3 spec). Choosing lz4 is
# deliberate and documented; repeating the warning per array and per read only buries real ones.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def has_scale(dtype: str) -> bool:
    return dtype in ("int8", "float8_e4m3")


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
    if dtype == "float8_e4m3":
        import torch  # a core dependency; imported here so `unipt cache ls` stays quick

        scale = np.abs(values).max(axis=1) / FLOAT8_MAX if len(values) else np.zeros(0, np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        # Clipped first: x / s can round a hair past 448, which float8_e4m3fn (no infinities) makes NaN.
        scaled = torch.from_numpy(np.clip(values / safe[:, None], -FLOAT8_MAX, FLOAT8_MAX))
        return scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), scale.astype(np.float32)
    raise UniptError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")


def decode_rows(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """The inverse of :func:`encode_rows` (exact for float16/float32, rounded for bfloat16/int8/float8)."""
    if dtype in ("float16", "float32"):
        return stored
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        if scale is None:
            raise UniptError("an int8 cache layer is missing its per-token scales; the store is damaged")
        return stored.astype(np.float32) * scale[:, None]
    if dtype == "float8_e4m3":
        if scale is None:
            raise UniptError("a float8_e4m3 cache layer is missing its per-token scales; store damaged")
        return _FLOAT8_VALUES[stored] * scale[:, None]
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
