"""What ``unipt plan`` predicts: each backbone's cache size, extraction and epoch times, the verdicts drawn
from them, and the plan's lines as the CLI prints them (:mod:`unipt.pipeline.experiment.plan` measures
them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from unipt.pipeline.log import human_bytes


@dataclass
class BackbonePlan:
    """The predictions for one backbone's cache of the whole dataset."""

    backbone: str
    key: str
    cached: bool  # the cache exists already: nothing to extract
    examples: int
    tokens: int  # predicted over the whole dataset
    layers: list[int]
    widths: list[int]
    sample_examples: int
    sample_tokens: int
    bytes_by_dtype: dict[str, int]  # predicted cache size on disk per storage dtype
    dtype: str  # the configured one
    extract_s: float  # predicted wall seconds of the extraction (0 when cached)
    fixed_s: float  # of which: Ray start, backbone load (measured on the sample)
    forward_s_per_1k_tokens: float
    cache_epoch_s: float
    online_epoch_s: float
    # The per-epoch verdict's parts (module doc, step 3); 0 for a backbone that does not train.
    read_gb_s: float = 0.0  # decoded GB/s reading the cache on this machine
    read_measured_on: str = ""  # "cache" (the real one) or "sample" (the float32 sample cache)
    forward_tokens_s: float = 0.0  # the backbone's steady forward on the training device
    forward_device: str = ""
    epoch_tokens: int = 0  # train + val tokens: what one epoch reads, or recomputes online
    epoch_read_bytes: int = 0  # decoded bytes one epoch reads from the cache (the configured dtype)
    step_epoch_s: float = 0.0  # UniPT's own seconds per epoch (no reading, no backbone)

    @property
    def predicted_bytes(self) -> int:
        return self.bytes_by_dtype[self.dtype]

    @property
    def epoch_read_s(self) -> float:
        return self.epoch_read_bytes / (self.read_gb_s * 1e9) if self.read_gb_s > 0 else float("inf")

    @property
    def epoch_forward_s(self) -> float:
        return self.epoch_tokens / self.forward_tokens_s if self.forward_tokens_s > 0 else float("inf")

    @property
    def epoch_winner(self) -> str:
        """``"cache"`` or ``"online"``: which way one epoch is faster on this machine."""
        return "cache" if self.cache_epoch_s <= self.online_epoch_s else "online"

    @property
    def epoch_speedup(self) -> float:
        """How many times faster the winning way's epoch is (>= 1)."""
        fast, slow = sorted((self.cache_epoch_s, self.online_epoch_s))
        return slow / fast if fast > 0 else float("inf")

    @property
    def break_even_read_gb_s(self) -> float:
        """The read rate at which reading an epoch takes as long as recomputing it with the backbone."""
        forward = self.epoch_forward_s
        return self.epoch_read_bytes / forward / 1e9 if 0 < forward < float("inf") else 0.0


@dataclass
class Plan:
    """Every backbone's predictions, the free space where the caches go, and whether caching pays off."""

    config_name: str
    cache_root: str
    free_bytes: int | None  # None: an object store, whose free space is not known
    epochs: int
    backbones: list[BackbonePlan] = field(default_factory=list)
    sample_s: float = 0.0

    @property
    def needed_bytes(self) -> int:
        return sum(b.predicted_bytes for b in self.backbones if not b.cached)

    @property
    def fits(self) -> bool | None:
        return None if self.free_bytes is None else self.needed_bytes <= self.free_bytes

    @property
    def cache_total_s(self) -> float:
        """Extract once, then every epoch from the cache (the primary backbone trains)."""
        primary = self.backbones[0]
        return sum(b.extract_s for b in self.backbones) + self.epochs * primary.cache_epoch_s

    @property
    def online_total_s(self) -> float:
        return self.epochs * self.backbones[0].online_epoch_s

    @property
    def pays_off(self) -> bool:
        return self.cache_total_s < self.online_total_s

    @property
    def break_even_epochs(self) -> int | None:
        """The fewest epochs from which the cache is faster overall (None: never, on these timings)."""
        primary = self.backbones[0]
        saved = primary.online_epoch_s - primary.cache_epoch_s
        if saved <= 0:
            return None
        return max(1, int(np.floor(sum(b.extract_s for b in self.backbones) / saved)) + 1)

    def as_dict(self) -> dict:
        data = asdict(self)
        for b, row in zip(self.backbones, data["backbones"], strict=True):
            row.update(
                epoch_read_s=b.epoch_read_s,
                epoch_forward_s=b.epoch_forward_s,
                epoch_winner=b.epoch_winner,
                epoch_speedup=b.epoch_speedup,
                break_even_read_gb_s=b.break_even_read_gb_s,
            )
        return {
            **data,
            "needed_bytes": self.needed_bytes,
            "fits": self.fits,
            "cache_total_s": self.cache_total_s,
            "online_total_s": self.online_total_s,
            "pays_off": self.pays_off,
            "break_even_epochs": self.break_even_epochs,
        }

    def lines(self) -> list[str]:
        """The human-readable plan, as ``unipt plan`` prints it."""
        out = [f"plan for {self.config_name} (measured on a sample, in {self.sample_s:.0f}s)"]
        for b in self.backbones:
            shape = f"{len(b.layers)} hidden states x {max(b.widths)}"
            out.append(
                f"{b.backbone} ({shape}): {b.examples:,} examples, ~{b.tokens:,} tokens "
                f"(sample: {b.sample_examples} examples, {b.sample_tokens:,} tokens)"
                + (f"; cache {b.key} exists, nothing to extract" if b.cached else "")
            )
            sizes = " | ".join(
                f"{dtype} {human_bytes(n)}{' (configured)' if dtype == b.dtype else ''}"
                for dtype, n in b.bytes_by_dtype.items()
            )
            out.append(f"  cache size   {sizes}")
            out.append(
                f"  extraction   ~{b.extract_s:.0f}s ({b.fixed_s:.0f}s start-up + "
                f"{b.forward_s_per_1k_tokens:.2f}s per 1k tokens)"
            )
            if not b.epoch_tokens:  # a backbone that does not train (retrieval's gallery): no epoch
                continue
            on = "the cache" if b.read_measured_on == "cache" else "the float32 sample cache"
            out.append(
                f"  read rate    {b.read_gb_s:.3g} GB/s decoded (measured on {on}); forward "
                f"{b.forward_tokens_s:,.0f} tokens/s on {b.forward_device}"
            )
            out.append(
                f"  one epoch    from the cache ~{b.cache_epoch_s:.1f}s "
                f"(read {human_bytes(b.epoch_read_bytes)}: {b.epoch_read_s:.1f}s "
                f"+ step {b.step_epoch_s:.1f}s) | online ~{b.online_epoch_s:.1f}s "
                f"({b.epoch_tokens:,} tokens through the backbone: {b.epoch_forward_s:.1f}s + step)"
            )
            out.append(
                f"  per epoch    {'the cache' if b.epoch_winner == 'cache' else 'online'} wins, "
                f"{b.epoch_speedup:.1f}x faster (the cache breaks even at a read rate of "
                f"{b.break_even_read_gb_s:.3g} GB/s)"
            )
        free = "unknown (object store)" if self.free_bytes is None else human_bytes(self.free_bytes)
        verdict = {
            None: "",
            True: ": fits",
            False: f": does NOT fit ({human_bytes(self.needed_bytes)} needed)",
        }
        out.append(f"free space   {free} at {self.cache_root}{verdict[self.fits]}")
        even = self.break_even_epochs
        when = f"break-even at {even} epoch(s)" if even else "the cache never catches up on this machine"
        out.append(
            f"{self.epochs} epochs  extract + train from the cache ~{self.cache_total_s:.0f}s vs online "
            f"~{self.online_total_s:.0f}s: {'caching pays off' if self.pays_off else 'online is faster'} "
            f"({when})"
        )
        return out
