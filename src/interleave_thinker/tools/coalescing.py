"""Merge generator requests from concurrent trajectories into batches before they reach the backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from interleave_thinker.tools.base import GenerationJob, ImageGenerator


@dataclass
class _Waiting:
    job: GenerationJob
    result: asyncio.Future[Image.Image | bytes]


class CoalescingGenerator:
    """Wraps a backend: jobs arriving within ``max_wait`` seconds share one backend call.

    A batch is sent as soon as it holds ``max_batch`` jobs, or when the oldest waiting job has
    waited ``max_wait``; so a lone trajectory pays at most ``max_wait`` of latency per call.
    The identity is the wrapped backend's: batching does not change any image.
    """

    def __init__(self, inner: ImageGenerator, *, max_batch: int = 8, max_wait: float = 0.05) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 1 and max_wait >= 0")
        self.inner = inner
        self.identity = inner.identity
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.backend_calls = 0
        self._waiting: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        loop = asyncio.get_running_loop()
        entries = [_Waiting(job, loop.create_future()) for job in jobs]
        self._waiting.extend(entries)
        if len(self._waiting) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self._flush)
        return list(await asyncio.gather(*(entry.result for entry in entries)))

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            # Keep a reference: the loop holds tasks only weakly.
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

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
