"""A block's rows as the loader holds them: decoded rows per layer, or read-only views into the pieces a
store keeps them in (chunk files' memory maps), and where each of the block's examples starts and stops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Block:
    """One block's decoded rows per layer, and where each of its examples' rows start and stop in them."""

    rows: dict[int, np.ndarray]
    starts: dict[int, np.ndarray]
    stops: dict[int, np.ndarray]


def blocks_over(
    pieces: dict[int, list[tuple[int, np.ndarray]]], starts: np.ndarray, stops: np.ndarray
) -> list[tuple[Block, int]]:
    """One block's examples (rows ``starts[j]:stops[j]`` in every layer) over each layer's ``(first row,
    rows)`` pieces, e.g. views into chunk files: the examples between two piece boundaries (of any layer)
    share one :class:`Block` over those pieces, with no copy; the few that straddle a boundary get their
    rows joined into one of their own."""
    cuts = np.array(sorted({first for each in pieces.values() for first, _ in each[1:]}), dtype=np.int64)
    part = np.searchsorted(cuts, starts, side="right")
    last = np.maximum(stops, starts + 1) - 1  # an example without rows belongs where it starts
    whole = np.searchsorted(cuts, last, side="right") == part
    items: list[tuple[Block, int] | None] = [None] * len(starts)
    for k in np.unique(part[whole]):
        members = np.flatnonzero(whole & (part == k))
        lo = int(starts[members[0]])
        rows, block_starts, block_stops = {}, {}, {}
        for layer, each in pieces.items():
            first, piece = each[_piece_at(each, lo)]
            rows[layer] = piece
            block_starts[layer], block_stops[layer] = starts[members] - first, stops[members] - first
        block = Block(rows, block_starts, block_stops)
        for i, member in enumerate(members):
            items[member] = (block, i)
    for member in np.flatnonzero(~whole):
        start, stop = int(starts[member]), int(stops[member])
        rows = {layer: _joined(each, start, stop) for layer, each in pieces.items()}
        length = np.array([stop - start], np.int64)
        zero = np.zeros(1, np.int64)
        items[member] = (Block(rows, dict.fromkeys(rows, zero), dict.fromkeys(rows, length)), 0)
    return items  # type: ignore[return-value]  (every example was placed above)


def _piece_at(pieces: list[tuple[int, np.ndarray]], row: int) -> int:
    """The index of the piece holding ``row``."""
    return max(0, int(np.searchsorted([first for first, _ in pieces], row, side="right")) - 1)


def _joined(pieces: list[tuple[int, np.ndarray]], start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` copied out of the pieces that hold them."""
    return np.concatenate([rows[max(start, first) - first : max(0, stop - first)] for first, rows in pieces])


def own_rows(item: tuple[Block, int]) -> tuple[Block, int]:
    """An example's rows copied out of its block, so that carrying it into the next shuffle window does not
    keep the whole block (every layer of up to ``block_examples`` examples) in memory."""
    block, i = item
    rows, starts, stops = {}, {}, {}
    for layer, layer_rows in block.rows.items():
        start, stop = int(block.starts[layer][i]), int(block.stops[layer][i])
        rows[layer] = layer_rows[start:stop].copy()
        starts[layer], stops[layer] = np.zeros(1, np.int64), np.array([stop - start], np.int64)
    return Block(rows, starts, stops), 0
