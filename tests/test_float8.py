"""float8_e4m3 caches: torch's float8_e4m3fn bits with a per-token scale, like int8 (same size, relative
rather than absolute rounding error). Training and predict on such a cache: tests/test_predict.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import KEY, build_cache, write_scaled_store
from unipt.pipeline.cache.encoding import FLOAT8_MAX, decode_rows, encode_rows
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot


def _rows(seed: int = 0) -> np.ndarray:
    """Tokens over six orders of magnitude, one all-zero token, one with a single large outlier."""
    rng = np.random.default_rng(seed)
    magnitudes = np.logspace(-3, 3, 64, dtype=np.float32)[:, None]
    rows = rng.standard_normal((64, 48)).astype(np.float32) * magnitudes
    rows[5] = 0.0
    rows[9, 3] = 100 * np.abs(rows[9]).max()  # an outlier 100x the token's other values
    return rows


def test_decoding_table_is_torchs_float8_e4m3fn():
    bits = torch.arange(256, dtype=torch.uint8)
    want = bits.view(torch.float8_e4m3fn).to(torch.float32).numpy()
    got = decode_rows(np.arange(256, dtype=np.uint8)[None, :], "float8_e4m3", np.ones(1, np.float32))[0]
    np.testing.assert_array_equal(got, want)  # NaN patterns (0x7F, 0xFF) included


def test_encoding_is_torchs_rounding_of_each_token_scaled_to_448():
    rows = _rows()
    stored, scale = encode_rows(rows, "float8_e4m3")
    assert stored.dtype == np.uint8 and scale is not None and scale.dtype == np.float32
    np.testing.assert_allclose(scale, np.abs(rows).max(axis=1) / FLOAT8_MAX, rtol=1e-6)
    safe = np.where(scale > 0, scale, 1)[:, None]
    want = torch.from_numpy(rows / safe).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(stored, want)
    decoded = decode_rows(stored, "float8_e4m3", scale)
    assert np.isfinite(decoded).all() and not decoded[5].any()  # no NaN at the top of the range, zeros stay
    # Each token's largest value is 448 x scale exactly: representable, so it survives exactly.
    top = np.abs(rows).argmax(axis=1)
    np.testing.assert_allclose(decoded[np.arange(64), top], rows[np.arange(64), top], rtol=1e-6)


def test_round_trip_error_is_relative_to_each_value_not_the_token_max():
    rows = _rows(1)
    stored, scale = encode_rows(rows, "float8_e4m3")
    decoded = decode_rows(stored, "float8_e4m3", scale)
    error = np.abs(decoded - rows)
    # 3 mantissa bits: half an ulp is 1/16 of the value; below the smallest normal (2^-6 in the scaled
    # domain) the spacing is fixed at 2^-9, so half of it, 2^-10 x scale, bounds the error there.
    bound = np.maximum(np.abs(rows) / 16, 2.0**-10 * scale[:, None]) * (1 + 1e-6) + 1e-30
    assert np.all(error <= bound)
    # int8's error is absolute (half a step of max/127): on the token with an outlier, fp8 keeps the small
    # values far better.
    q, s = encode_rows(rows, "int8")
    int8_error = np.abs(decode_rows(q, "int8", s) - rows)[9]
    small = np.abs(rows[9]) < np.abs(rows[9]).max() / 10
    relative = np.abs(rows[9][small])
    assert np.median(error[9][small] / relative) < 0.2 * np.median(int8_error[small] / relative)


def test_store_round_trip_and_size(tmp_path):
    root = CacheRoot(tmp_path / "rt")
    values = write_scaled_store(root, "float8_e4m3")
    reader = open_cache(root.location(KEY))
    assert reader.dtype == "float8_e4m3"
    for i, want in enumerate(values):
        got = reader.read_example(i, 0)
        assert got.dtype == np.float32
        stored, scale = encode_rows(want, "float8_e4m3")
        np.testing.assert_array_equal(got, decode_rows(stored, "float8_e4m3", scale))

    sizes = {}
    for dtype in ("float16", "float8_e4m3"):
        cache_root = CacheRoot(tmp_path / dtype)
        build_cache(cache_root, [40] * 12, {0: 64}, shard_size=4, chunk_rows=64, dtype=dtype, codec="none")
        sizes[dtype] = open_cache(cache_root.location(KEY)).nbytes_on_disk()
    # One byte a value plus a float32 scale per 64-value token: (64 + 4) / 128 of fp16.
    assert 0.45 < sizes["float8_e4m3"] / sizes["float16"] < 0.6


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_a_scaled_layer_without_its_scales_is_refused(dtype):
    stored, _ = encode_rows(_rows(), dtype)
    with pytest.raises(Exception, match="per-token scales"):
        decode_rows(stored, dtype, None)
