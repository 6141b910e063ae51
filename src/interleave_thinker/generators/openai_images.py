"""An image generator over an OpenAI-compatible Images API: OpenAI's image models or vllm-omni."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from interleave_thinker.errors import ConfigurationError, GeneratorError, TransientGeneratorError, one_line
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.settings import find_api_key, redact_url
from interleave_thinker.storage.image_store import encode_png

__all__ = ["OpenAIImagesGenerator"]

INSTALL_HINT = "install the served-model extra: pip install 'interleave-thinker[openai]'"
# Pinned rather than left to the SDK, which would follow $OPENAI_BASE_URL behind the identity's back.
OPENAI_URL = "https://api.openai.com/v1"
# OpenAI's limit on n; one request never asks for more.
MAX_N = 10
_REFUSAL_CODES = ("content_policy_violation", "moderation_blocked")
_FORMATS = {"PNG", "JPEG", "WEBP"}
# GPT image models always answer base64 and refuse the legacy response_format parameter.
_BASE64_ONLY_PREFIXES = ("gpt-image", "chatgpt-image")


@dataclass(frozen=True)
class _Request:
    """One HTTP request: the jobs at ``indices`` share it, one image each (n = their count)."""

    indices: tuple[int, ...]
    job: GenerationJob


class OpenAIImagesGenerator:
    """An ``ImageGenerator`` that draws each job through ``/v1/images/generations`` or ``/edits``.

    Text-to-image jobs POST JSON to ``images/generations``; edits POST the source images as PNG
    files (multipart) to ``images/edits``, the first being the one edited. With ``send_seed`` the
    job's seed goes in the body and every job is its own request; without it, jobs that differ
    only in seed share one request with ``n`` images. It defaults to on for a ``base_url``
    server (vllm-omni reads the seed) and off for api.openai.com, which has none.
    ``send_response_format`` (default: off for ``gpt-image*`` models, which refuse it) asks
    for ``b64_json``. Requests run concurrently, at most ``max_concurrency`` at a time per
    generator. Images come back as the bytes the server sent (PNG, JPEG or WebP).

    The SDK retries 408/409/429/5xx, timeouts and connection errors ``max_retries`` times with
    backoff; what still fails raises ``TransientGeneratorError`` (the graph may retry later).
    Refused prompts, bad keys, unknown models and unreadable replies raise ``GeneratorError``.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 6,
        extra_body: dict[str, Any] | None = None,
        send_seed: bool | None = None,
        send_response_format: bool | None = None,
        max_concurrency: int = 4,
        http_client: Any = None,
    ) -> None:
        if not model:
            raise ConfigurationError("the images model name is empty", hint="pass model=")
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be 0 or more, not {max_retries}")
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, not {timeout}")
        self.model = model
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.extra_body = dict(extra_body or {})
        # OpenAI's Images API has no seed; servers behind a base_url (vllm-omni) read one.
        self.send_seed = base_url is not None if send_seed is None else send_seed
        if send_response_format is None:
            send_response_format = not model.lower().startswith(_BASE64_ONLY_PREFIXES)
        self.send_response_format = send_response_format
        self.max_concurrency = max_concurrency
        self._api_key = find_api_key(api_key) or "EMPTY"
        self._http_client = http_client
        # Stored in threads and shown in reports: credentials in the URL are masked.
        shown_url = redact_url(base_url) if base_url else "api.openai.com"
        self.identity = f"openai-images:{shown_url}:{model}"
        if self.extra_body:
            # Server settings such as steps or guidance change the pixels, so they name the backend too.
            self.identity += f" ({json.dumps(self.extra_body, sort_keys=True, default=str)})"
        # Clients and semaphores belong to one event loop; asyncio.run() twice must not share them.
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, asyncio.Semaphore]]
        self._per_loop = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"OpenAIImagesGenerator({self.identity})"

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        jobs = list(jobs)
        for job in jobs:
            if job.width < 1 or job.height < 1:
                raise GeneratorError(
                    f"cannot draw a {job.width}x{job.height} image", hint="use a positive size"
                )
        client, semaphore = self._client_and_semaphore()
        sources = await asyncio.to_thread(_encode_sources, jobs)

        async def run(request: _Request) -> tuple[tuple[int, ...], list[bytes]]:
            async with semaphore:
                return request.indices, await self._draw(client, request, sources)

        tasks = [asyncio.ensure_future(run(request)) for request in self._plan(jobs, sources)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One failure fails the batch: stop paying for the requests still waiting or in flight.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        images: dict[int, bytes] = {}
        for indices, drawn in results:
            images.update(zip(indices, drawn, strict=True))
        return [images[index] for index in range(len(jobs))]

    async def aclose(self) -> None:
        """Close the HTTP client this generator opened on the running loop (a given one stays open)."""
        entry = self._per_loop.pop(asyncio.get_running_loop(), None)
        if entry is not None and self._http_client is None:
            await entry[0].close()

    # -- planning ----------------------------------------------------------------------------------

    def _plan(self, jobs: list[GenerationJob], sources: dict[int, _Source]) -> list[_Request]:
        if self.send_seed:
            # Each seed needs its own request: one request has one seed for all its n images.
            return [_Request((index,), job) for index, job in enumerate(jobs)]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            digests = tuple(sources[id(image)].digest for image in job.source_images)
            groups.setdefault((job.prompt, job.width, job.height, digests), []).append(index)
        return [
            _Request(tuple(indices[start : start + MAX_N]), jobs[indices[start]])
            for indices in groups.values()
            for start in range(0, len(indices), MAX_N)
        ]

    # -- drawing -----------------------------------------------------------------------------------

    async def _draw(self, client: Any, request: _Request, sources: dict[int, _Source]) -> list[bytes]:
        import openai

        job = request.job
        n = len(request.indices)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "prompt": job.prompt,
            "n": n,
            "size": f"{job.width}x{job.height}",
        }
        if self.send_response_format:
            kwargs["response_format"] = "b64_json"
        extra = dict(self.extra_body)
        if self.send_seed:
            extra["seed"] = job.seed
        if extra:
            kwargs["extra_body"] = extra
        try:
            if job.source_images:
                files = [
                    (f"source-{number}.png", sources[id(image)].png, "image/png")
                    for number, image in enumerate(job.source_images)
                ]
                # One file goes as the classic "image" field; several as the "image[]" array.
                image = files[0] if len(files) == 1 else files
                response = await client.images.edit(image=image, **kwargs)
            else:
                response = await client.images.generate(**kwargs)
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                # The SDK's error holds the server's reply whole, and a careless server repeats
                # the key it was sent; ours says all of it, with the key masked.
                raise self._status_error(exc, job) from None
            raise self._status_error(exc, job) from exc
        except openai.APITimeoutError as exc:
            raise TransientGeneratorError(
                f"{self._where(job)}: the image server did not answer within {self.timeout:g} s "
                f"({self.max_retries} retries)"
            ) from exc
        except openai.APIConnectionError as exc:
            raise TransientGeneratorError(
                f"{self._where(job)}: cannot reach the image server at {self._shown_url()} "
                f"({self.max_retries} retries): {_cause(exc)}"
            ) from exc
        except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
            # The SDK lets a bare JSONDecodeError out when a 200's body is not JSON.
            raise GeneratorError(
                f"{self._where(job)}: the image server's reply is not JSON: {one_line(exc)}",
                hint=f"check that {self._shown_url()} is an OpenAI-compatible Images API",
            ) from exc
        return self._decode(response, n, job)

    def _decode(self, response: Any, n: int, job: GenerationJob) -> list[bytes]:
        hint = f"check that {self._shown_url()} is an OpenAI-compatible Images API"
        data = getattr(response, "data", None)
        if not isinstance(data, list):
            raise GeneratorError(f"{self._where(job)}: the image server's reply has no image data", hint=hint)
        if len(data) != n:
            raise GeneratorError(
                f"{self._where(job)}: the image server returned {len(data)} image(s) for n={n}", hint=hint
            )
        images = []
        for item in data:
            encoded = getattr(item, "b64_json", None)
            if not encoded:
                if getattr(item, "url", None):
                    raise GeneratorError(
                        f"{self._where(job)}: the image server returned a URL instead of image data",
                        hint="let the generator send response_format=b64_json (send_response_format=True)",
                    )
                raise GeneratorError(
                    f"{self._where(job)}: the image server returned no image data", hint=hint
                )
            images.append(_decoded_image(encoded, self._where(job), hint))
        return images

    def _status_error(self, exc: Any, job: GenerationJob) -> Exception:
        status = exc.status_code
        where = self._where(job)
        # A careless server may repeat the key it was sent; the message must not.
        message = _server_message(exc)
        if len(self._api_key) >= 8:
            message = message.replace(self._api_key, "***")
        code = str(getattr(exc, "code", None) or "")
        if status == 400 and (code in _REFUSAL_CODES or any(word in message for word in _REFUSAL_CODES)):
            return GeneratorError(
                f"{where}: the image service refused the prompt ({code or 'content policy'}); "
                f"the step cannot be drawn as worded: {message}",
                hint="reword the step's prompt, or use a generator without this content filter",
            )
        if status in (401, 403):
            return GeneratorError(
                f"{where}: the image server at {self._shown_url()} refused the API key "
                f"(HTTP {status}): {message}",
                hint="set INTERLEAVE_API_KEY (or OPENAI_API_KEY) to a key this server accepts",
            )
        if status == 404:
            return GeneratorError(
                f"{where}: the image server at {self._shown_url()} has no model {self.model!r} "
                f"(HTTP 404): {message}",
                hint="check the model name (vllm-omni serves the name it was started with) and base_url",
            )
        if status == 429 and code == "insufficient_quota":
            return GeneratorError(f"{where}: the account is out of quota: {message}", hint="check billing")
        if status in (408, 409, 429) or status >= 500:
            return TransientGeneratorError(
                f"{where}: the image server is busy or failing (HTTP {status}, after "
                f"{self.max_retries} retries): {message}"
            )
        hint = "see the server's message; sizes and parameters differ between models"
        if "seed" in message and self.send_seed:
            hint = "this server takes no seed: set send_seed=False"
        return GeneratorError(
            f"{where}: the image server rejected the request (HTTP {status}): {message}", hint=hint
        )

    # -- helpers -----------------------------------------------------------------------------------

    def _client_and_semaphore(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        entry = self._per_loop.get(loop)
        if entry is None:
            try:
                import openai
            except ImportError as exc:
                raise ConfigurationError(
                    "the OpenAI images generator needs openai", hint=INSTALL_HINT
                ) from exc
            client = openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self._url(),
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=self._http_client,
            )
            entry = (client, asyncio.Semaphore(self.max_concurrency))
            self._per_loop[loop] = entry
        return entry

    def _url(self) -> str:
        return self.base_url or OPENAI_URL

    def _shown_url(self) -> str:
        """The server URL for messages, with any credentials in it masked."""
        return redact_url(self._url())

    def _where(self, job: GenerationJob) -> str:
        parts = [f"step {job.step}", f"attempt {job.attempt}"]
        if job.thread_id:
            parts.insert(0, f"thread {job.thread_id}")
        return f"{self.model} ({', '.join(parts)})"


@dataclass(frozen=True)
class _Source:
    png: bytes
    digest: str


def _encode_sources(jobs: Sequence[GenerationJob]) -> dict[int, _Source]:
    """PNG bytes of every distinct source image, keyed by object id (a batch often shares them)."""
    encoded: dict[int, _Source] = {}
    for job in jobs:
        for image in job.source_images:
            if id(image) not in encoded:
                png = encode_png(image)
                encoded[id(image)] = _Source(png, hashlib.sha256(png).hexdigest())
    return encoded


def _decoded_image(encoded: str, where: str, hint: str) -> bytes:
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GeneratorError(f"{where}: the image server's b64_json is not valid base64", hint=hint) from exc
    try:
        # Header only: the image store decodes fully when it stores the bytes.
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except (UnidentifiedImageError, OSError) as exc:
        raise GeneratorError(
            f"{where}: the image server's data is not an image ({len(data)} bytes)", hint=hint
        ) from exc
    if fmt not in _FORMATS:
        raise GeneratorError(
            f"{where}: the image server returned a {fmt} image; PNG, JPEG or WebP are stored",
            hint='ask for another format, e.g. extra_body={"output_format": "png"}',
        )
    return data


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
        if isinstance(error, str):
            return error
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return getattr(exc, "message", "") or str(exc)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return one_line(cause) if cause is not None else one_line(exc)
