"""The next global batches, prepared in a background thread while the current step trains.

* One producer thread runs the batch stream (reading, decompressing, tokenizing with chat
  templates, grouping into global batches) up to ``depth`` items ahead, into a bounded queue.
* The consumer gets exactly the stream's items, in the stream's order, each with the position
  and counters right after it: what the trainer records for a checkpoint is unchanged, so a
  resume stays bitwise.
* An exception in the stream (a bad record, named with its file and line) is raised in the
  consumer when it reaches that point, as if it had been read there: the steps before it are
  trained and saved first, as without prefetching.
* :meth:`Prefetcher.close` stops the producer (a run that stops early); the thread is a daemon,
  so an interpreter that exits does not wait for it.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterate ``items`` with up to ``depth`` of them prepared ahead in a background thread."""

    def __init__(self, items: Iterator, depth: int):
        if depth < 1:
            raise ValueError(f"depth={depth}: prefetching needs at least one item ahead")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,),
                                        name="chunkflow-prefetch", daemon=True)
        self._done = False
        self._thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised where it would have been
            self._put(_Raised(e))
            return
        self._put(_END)

    def _put(self, item) -> bool:
        """Queue ``item``, waiting for room; False once the consumer closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer; what it prepared is dropped."""
        self._done = True
        self._stop.set()
        self._thread.join(timeout=5)
