"""Merge generator requests from concurrent trajectories into batches before they reach the backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from interleave_thinker.generators.base import GenerationJob, ImageGenerator


@dataclass
class _Waiting:
    job: GenerationJob
    result: asyncio.Future[Image.Image | bytes]


class CoalescingGenerator:
    """Wraps a backend: jobs from concurrent trajectories share backend calls.

    A batch is sent when it holds ``max_batch`` jobs, or when its oldest job has waited
    ``max_wait`` seconds, so a lone trajectory pays at most ``max_wait`` of latency per call.
    At most ``max_in_flight`` calls run at once (one GPU: 1). While they run, new jobs wait, and
    the moment a call ends everything that gathered meanwhile goes out in the next batch: with a
    busy backend the batches grow towards ``max_batch`` instead of queueing one small call
    behind another. ``max_in_flight=None`` never holds a batch back (a server that takes many
    concurrent calls). The identity is the wrapped backend's: batching does not change any image.
    """

    def __init__(
        self,
        inner: ImageGenerator,
        *,
        max_batch: int = 8,
        max_wait: float = 0.05,
        max_in_flight: int | None = 1,
    ) -> None:
        if max_batch < 1 or max_wait < 0 or (max_in_flight is not None and max_in_flight < 1):
            raise ValueError("max_batch and max_in_flight must be >= 1 and max_wait >= 0")
        self.inner = inner
        self.identity = inner.identity
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_in_flight = max_in_flight
        self.backend_calls = 0
        self._waiting: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        # Set when the oldest waiting job has waited max_wait: it goes with the next free slot.
        self._due = False
        self._in_flight: set[asyncio.Task[None]] = set()

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        loop = asyncio.get_running_loop()
        entries = [_Waiting(job, loop.create_future()) for job in jobs]
        self._waiting.extend(entries)
        self._dispatch()
        if self._waiting and self._timer is None and not self._due:
            self._timer = loop.call_later(self.max_wait, self._wait_is_over)
        return list(await asyncio.gather(*(entry.result for entry in entries)))

    def _has_room(self) -> bool:
        return self.max_in_flight is None or len(self._in_flight) < self.max_in_flight

    def _wait_is_over(self) -> None:
        self._timer = None
        self._due = True
        self._dispatch()

    def _dispatch(self) -> None:
        """Send what may go now: full batches, or anything once its wait is over."""
        while self._waiting and self._has_room():
            if len(self._waiting) < self.max_batch and not self._due:
                return
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            self._start(batch)
        if not self._waiting:
            self._due = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _start(self, batch: list[_Waiting]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(batch))
        # Keep a reference: the loop holds tasks only weakly.
        self._in_flight.add(task)
        task.add_done_callback(self._call_ended)

    def _call_ended(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        # Jobs that gathered during the call have waited long enough already.
        if self._waiting:
            self._due = True
            self._dispatch()

    async def _send(self, batch: list[_Waiting]) -> None:
        self.backend_calls += 1
        try:
            images = await self.inner.agenerate([entry.job for entry in batch])
            if len(images) != len(batch):
                raise ValueError(
                    f"generator {self.identity} returned {len(images)} images for {len(batch)} jobs"
                )
        except BaseException as exc:  # every waiter must learn of the failure, whatever it is
            for entry in batch:
                if not entry.result.done():
                    entry.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for entry, image in zip(batch, images, strict=True):
            if not entry.result.done():
                entry.result.set_result(image)
