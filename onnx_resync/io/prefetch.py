"""Run an iterator ahead of its consumer in a thread: while the consumer writes one piece of a
tensor to disk, the next piece is computed (numpy's gathers and the file write both release the
GIL, so two cores share the work).

Errors raised by the iterator reach the consumer where it would have met them; a consumer that
stops early (an error of its own, a break) stops the producer, which never runs more than `depth`
pieces ahead, so at most that many pieces are held at once. `now`: the producer starts at once, not
at the first item asked for (a consumer with work of its own before it reads: the first pieces are
ready then); one dropped before it reads stops the producer too.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 2, now: bool = False) -> Iterator[T]:
    """Yield what `items` yields, computed up to `depth` items ahead in a background thread
    (started now, or at the first item asked for)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Raised(exc))
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="onnx-resync-prefetch", daemon=True)
    consumer = _consumed(ready, stop, worker)
    if now:
        worker.start()
        weakref.finalize(consumer, stop.set)  # (dropped before it ran: its `finally` never runs)
    return consumer


def _consumed(ready: queue.Queue, stop: threading.Event, worker: threading.Thread) -> Iterator:
    """The consumer's side (the worker started at the first item asked for, unless it runs already)."""
    if worker.ident is None:
        worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
