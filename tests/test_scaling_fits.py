"""benchmarks/scaling.py's exponents: least-squares slopes in log-log space, None where no fit exists."""

from __future__ import annotations

import pytest

from benchmarks.scaling import fits, slope


def test_slope_recovers_a_power_law():
    assert slope([1e3, 2e3, 4e3], [3 * x**1.5 for x in (1e3, 2e3, 4e3)]) == pytest.approx(1.5)
    assert slope([5.0, 5.0], [1.0, 2.0]) is None  # one distinct x: no exponent


def test_fits_per_backbone_and_per_size():
    def row(name: str, size: int, tokens: int, params: int) -> dict:
        width = {"a": 1, "b": 4}[name]
        return {
            "backbone": name, "size": size, "tokens": tokens, "params": params,
            "fp16_bytes": 2.0 * tokens * width, "int8_bytes": 1.0 * tokens * width,
            "forward_s": tokens * params * 1e-9, "forward_s_per_1k_tokens": params * 1e-6,
            "cache_epoch_s": tokens * 1e-3, "online_epoch_s": tokens * params * 1e-9,
        }  # fmt: skip

    rows = [row("a", n, 25 * n, 10**6) for n in (100, 200)] + [row("b", 100, 2500, 16 * 10**6)]
    result = fits(rows)
    assert result["by_dataset_size"]["a"]["fp16_bytes"] == pytest.approx(1.0)
    assert result["by_dataset_size"]["b"]["fp16_bytes"] is None  # a single size
    assert result["by_backbone"]["100"]["forward_s_per_1k_tokens"] == pytest.approx(1.0)
    assert result["by_backbone"]["100"]["fp16_bytes"] == pytest.approx(0.5)  # width 4x for params 16x
    assert result["by_backbone"]["200"]["fp16_bytes"] is None
