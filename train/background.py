"""An iterator run in a background thread a bounded number of items ahead: the loader's block reads and its
padding overlap training with it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def in_background(source: Iterator[T], depth: int, name: str = "cache-prefetch") -> Iterator[T]:
    """Run ``source`` in a background thread, ``depth`` items ahead (Zarr decodes off the GIL).

    At most ``depth`` items exist outside the caller at once, queued or still being made: the producer
    takes a slot before it makes an item and the caller frees it when it takes one. (A bounded queue
    alone would hold one more: the item made while the queue is full, waiting to be put; for padded
    BERT-large batches that is a training step's whole input.)
    """
    items: queue.Queue = queue.Queue()
    slots = threading.Semaphore(max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(source, done)
                items.put(item)
                if item is done:
                    return
        except BaseException as exc:  # handed to the consumer, re-raised there
            items.put(exc)
            items.put(done)

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while (item := items.get()) is not done:
            slots.release()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
