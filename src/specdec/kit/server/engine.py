"""The engine of `specdec serve` (kit): one background thread drives `Scheduler.step()`.

The asyncio side submits requests and receives their `Event`s through one asyncio.Queue per
request. A row that raises inside a round fails alone (the scheduler quarantines it); should
`step()` itself raise (a fault no row owns, e.g. in the batched model call), the rows of that
round fail and a fresh scheduler takes over the waiting requests, which never ran.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

from .metrics import Metrics
from .validation import APIError


class Engine:
    """Owns the scheduler; `step()` runs in one background thread, events go back to asyncio."""

    def __init__(self, make_scheduler, metrics: Metrics, max_queue: int = 64, device=None):
        self.make_scheduler = make_scheduler
        self.device = device  # an mx.Device for the scheduler thread (None: MLX's default)
        self.scheduler = make_scheduler()
        self.metrics = metrics
        self.max_queue = max_queue
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, float]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="specdec-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def submit(self, request) -> asyncio.Queue:
        """Queue a request; 429 (with Retry-After) when `max_queue` requests already wait."""
        waiting = len(self.scheduler.waiting)
        if waiting >= self.max_queue:
            raise APIError(429, f"the server is busy: {waiting} requests are already waiting "
                           f"(--max-queue {self.max_queue}); retry later", None, "rate_limit_error",
                           headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.sinks[id(request)] = (loop, queue, time.perf_counter())
        try:
            self.scheduler.submit(request)  # a deque append: safe while step() runs
        except ValueError as e:
            del self.sinks[id(request)]
            raise APIError(400, str(e), None) from None
        self.wake.set()
        return queue

    def cancel(self, request) -> None:
        """The client went away: the next step drops the row (counted as cancelled)."""
        if request.finish_reason is None:
            request.cancel()
            self.wake.set()

    def counts(self) -> tuple[int, int]:
        s = self.scheduler
        return len(s.rows), len(s.waiting)

    def deliver(self, event) -> None:
        request = event.request
        sink = self.sinks.get(id(request))
        if sink is None:
            return
        loop, queue, started = sink
        if event.finish_reason is not None:
            del self.sinks[id(request)]
            self.metrics.finished(request, time.perf_counter() - started)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    def run(self) -> None:
        if self.device is not None:
            import mlx.core as mx

            mx.set_default_device(self.device)
        while not self.stopping:
            if not self.scheduler.has_work:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                with self.lock:
                    events = self.scheduler.step()
            except Exception as error:  # noqa: BLE001 — a fault no row owns: fail that round's rows
                traceback.print_exc()
                events = self.reset(f"the scheduler failed: {type(error).__name__}: {error}")
            for event in events:
                self.deliver(event)
            rows, waiting = self.counts()
            self.metrics.running.set(rows)
            self.metrics.waiting.set(waiting)

    def reset(self, message: str) -> list:
        """Fail the running rows with `message` (their caches are in an unknown state); a fresh
        scheduler keeps the waiting requests, which never ran."""
        old = self.scheduler
        with self.lock:
            fresh = self.make_scheduler()
            self.scheduler = fresh  # new submissions go here from now on
            moved = []
            while old.waiting:
                moved.append(old.waiting.popleft())
            fresh.waiting.extendleft(reversed(moved))  # oldest first, ahead of any newcomer
        return [old.finish(request, "error", message) for request in old.rows]
