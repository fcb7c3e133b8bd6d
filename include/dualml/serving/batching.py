"""Server-side dynamic batching: concurrent requests share one model call (pure Python, threads).

Every request's instances go into one queue; a single worker thread takes what is queued and
calls the model once for all of it, then hands each request its own slice of the outputs. A
request is never split over two model calls (one larger than ``max_batch_size`` runs alone), so
its predictions are exactly what a call with only its instances returns.

When to run a batch (the TF Serving / KServe knobs, with one refinement):

- at once when the batch is full (``max_batch_size`` instances);
- at once when nothing else is on its way: no other request has been admitted and is still being
  read or parsed (``expect()`` counts them). One client therefore never waits for a timer;
- otherwise up to ``timeout_s`` after the first request of the batch arrived, for the requests on
  their way to join.

Under load, requests queue while the model is busy and the next call takes them all: that is
where the throughput comes from. The queue is bounded by the caller (admission control in
``dualml.serving.app``), never here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger("dualml.serving")


@dataclass
class BatchResult:
    """One request's share of a model call."""

    outputs: list
    batch_size: int  # instances in the model call this request was part of
    batch_requests: int  # requests in that call
    queue_s: float = 0.0  # from submit() to the start of that call
    model_s: float = 0.0  # the call itself


@dataclass
class _Pending:
    items: Sequence
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class BatcherStopped(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class DynamicBatcher:
    """Merge concurrent ``submit()`` calls into calls of ``predict(items) -> outputs`` (same order).

    ``predict`` runs on ``threads`` worker threads, each forming and running its own batches (TF
    Serving's ``num_batch_threads``): on 2 cores one TensorFlow call leaves CPU idle between its
    ops, so two calls in flight get more done than one (see docs/design.md, "Serving").
    If a merged call raises, each request in it is retried alone so that one bad request fails
    only itself.
    """

    def __init__(
        self,
        predict: Callable[[list], list],
        *,
        max_batch_size: int,
        timeout_s: float,
        threads: int = 1,
        name: str = "dualml-batcher",
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._expected = 0
        self._stopping = False
        self.batches = 0  # model calls made (for logs and tests)
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    # --- producer side (any thread) ------------------------------------------------------
    def expect(self) -> None:
        """A request was admitted and will ``submit()`` (or ``forget()``) soon: worth waiting for."""
        with self._cond:
            self._expected += 1

    def forget(self) -> None:
        """An expected request will not be submitted after all (it failed validation)."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify()

    def submit(self, items: Sequence, *, expected: bool = True) -> Future:
        """Queue ``items`` (one request); the future resolves to a BatchResult."""
        if not items:
            raise ValueError("submit() needs at least one item")
        pending = _Pending(items)
        with self._cond:
            if expected:
                self._expected = max(0, self._expected - 1)
            if self._stopping:
                raise BatcherStopped("the server is shutting down")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    @property
    def queued_requests(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, timeout_s: float = 30) -> None:
        """Finish what is queued, then end the worker threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- the worker --------------------------------------------------------------------------
    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            deadline = time.monotonic() + self.timeout_s
            while size < self.max_batch_size:
                if self._queue:
                    if size + len(self._queue[0].items) > self.max_batch_size:
                        break  # never split a request: it leads the next batch
                    nxt = self._queue.popleft()
                    batch.append(nxt)
                    size += len(nxt.items)
                    continue
                remaining = deadline - time.monotonic()
                if self._expected <= 0 or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self.batches += 1
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._call(batch)

    def _call(self, batch: list[_Pending]) -> None:
        items = [item for p in batch for item in p.items]
        start = time.perf_counter()
        try:
            outputs = self._predict(items)
            if len(outputs) != len(items):
                raise RuntimeError(f"model returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            log.warning("a batch of %d requests failed (%s); retrying each alone", len(batch), e)
            for p in batch:
                self._call_alone(p)
            return
        model_s = time.perf_counter() - start
        offset = 0
        for p in batch:
            n = len(p.items)
            p.future.set_result(BatchResult(outputs[offset : offset + n], len(items), len(batch),
                                            start - p.submitted, model_s))
            offset += n

    def _call_alone(self, p: _Pending) -> None:
        start = time.perf_counter()
        try:
            outputs = self._predict(list(p.items))
            if len(outputs) != len(p.items):
                raise RuntimeError(f"model returned {len(outputs)} outputs for {len(p.items)} inputs")
        except Exception as e:
            p.future.set_exception(e)
        else:
            p.future.set_result(BatchResult(outputs, len(p.items), 1, start - p.submitted,
                                            time.perf_counter() - start))
