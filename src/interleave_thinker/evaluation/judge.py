"""The judge: any LangChain chat model asked a prompt and read by a parser, with retries and a cache.

Generic on purpose, so that training rewards can use it as well as the benchmark scorers:
``await judge.ask(prompt, parse)`` returns what ``parse`` made of the reply, or raises
``JudgeFailure`` once the tries are spent. ``JudgeCache`` records each verdict under
(item, criterion, judge identity) so a rescore asks only what it has no answer to.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatResult
from PIL import Image
from pydantic import ConfigDict

from interleave_thinker.context import model_label
from interleave_thinker.errors import ConfigurationError, InterleaveError, one_line
from interleave_thinker.storage.atomic import write_atomically
from interleave_thinker.storage.image_store import inspect_image

__all__ = [
    "ImageInput",
    "Judge",
    "JudgeCache",
    "JudgeFailure",
    "JudgeMessage",
    "JudgePrompt",
    "JudgeUnavailable",
    "UnreadableReply",
    "Verdict",
    "ask_cached",
    "image_input",
    "judge_chat_model",
    "system",
    "user",
]


class UnreadableReply(ValueError):
    """A parser's way of saying the reply does not hold what it looks for (the judge is asked again)."""


class JudgeFailure(InterleaveError):
    """The judge gave no readable answer within its tries; the criterion is unjudged, never 0."""

    def __init__(self, message: str, *, replies: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.replies = list(replies)


class JudgeUnavailable(InterleaveError):
    """The judge cannot answer anything (bad key, unknown model): scoring stops rather than fail each call."""


# -- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """An image file sent to the judge, optionally shrunk to ``max_side`` and re-encoded as
    ``format`` (what the benchmark's own scorer does before sending it); named by its hash."""

    path: Path
    sha256: str
    max_side: int | None = None
    format: str | None = None

    @property
    def key(self) -> str:
        return f"{self.sha256}:{self.max_side or 0}:{self.format or 'as-is'}"

    def block(self) -> dict[str, str]:
        """A standard base64 image content block with the bytes the judge gets."""
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ConfigurationError(f"image {self.path} changed while it was being judged")
        if self.max_side is None and self.format is None:
            media_type = inspect_image(data, what=f"image {self.path}")[0]
        else:
            with Image.open(io.BytesIO(data)) as image:
                fmt = (self.format or image.format or "PNG").upper()
                copy = image.convert("RGB") if fmt == "JPEG" else image.copy()
            if self.max_side is not None:
                copy.thumbnail((self.max_side, self.max_side))
            buffer = io.BytesIO()
            copy.save(buffer, format=fmt)
            data = buffer.getvalue()
            media_type = f"image/{fmt.lower()}"
        return {"type": "image", "base64": base64.b64encode(data).decode("ascii"), "mime_type": media_type}


def image_input(path: str | os.PathLike[str], *, max_side: int | None = None, format: str | None = None
                ) -> ImageInput:
    path = Path(path)
    return ImageInput(path, hashlib.sha256(path.read_bytes()).hexdigest(), max_side, format)


Content = str | ImageInput


@dataclass(frozen=True)
class JudgeMessage:
    role: str  # system | user
    content: tuple[Content, ...]


def system(text: str) -> JudgeMessage:
    return JudgeMessage("system", (text,))


def user(*content: Content) -> JudgeMessage:
    return JudgeMessage("user", tuple(content))


@dataclass(frozen=True)
class JudgePrompt:
    """What the judge is asked: messages of text and images (images named by hash)."""

    messages: tuple[JudgeMessage, ...]

    @classmethod
    def of(cls, *messages: JudgeMessage) -> JudgePrompt:
        return cls(tuple(messages))

    def describe(self) -> list[dict[str, Any]]:
        """The prompt as JSON, images by hash and transform: what decides the judge's answer."""
        return [
            {
                "role": message.role,
                "content": [
                    {"type": "text", "text": part} if isinstance(part, str)
                    else {"type": "image", "image": part.key}
                    for part in message.content
                ],
            }
            for message in self.messages
        ]

    def digest(self) -> str:
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def images(self) -> list[ImageInput]:
        return [part for message in self.messages for part in message.content if isinstance(part, ImageInput)]

    def to_messages(self) -> list[BaseMessage]:
        """LangChain messages whose images are references (``file_id``), inlined below the trace."""
        converted: list[BaseMessage] = []
        for message in self.messages:
            if len(message.content) == 1 and isinstance(message.content[0], str):
                content: Any = message.content[0]
            else:
                content = [
                    {"type": "text", "text": part} if isinstance(part, str)
                    else {"type": "image", "file_id": f"{_REF}{part.key}"}
                    for part in message.content
                ]
            converted.append(SystemMessage(content) if message.role == "system" else HumanMessage(content))
        return converted


_REF = "judge-image:"


class _InliningModel(BaseChatModel):
    """Puts the image bytes into the messages just below the traced call, as the runs do."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseChatModel
    images: dict[str, ImageInput]

    @property
    def _llm_type(self) -> str:
        return self.inner._llm_type

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.inner._identifying_params

    def _inline(self, messages: list[BaseMessage]) -> list[BaseMessage]:
        out = []
        for message in messages:
            if isinstance(message.content, list):
                blocks = [self._block(block) for block in message.content]
                message = message.model_copy(update={"content": blocks})
            out.append(message)
        return out

    def _block(self, block: Any) -> Any:
        if isinstance(block, dict) and isinstance(block.get("file_id"), str):
            key = block["file_id"].removeprefix(_REF)
            if key in self.images:
                return self.images[key].block()
        return block

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self.inner._generate(self._inline(messages), stop=stop, run_manager=run_manager, **kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                         ) -> ChatResult:
        inlined = await asyncio.to_thread(self._inline, messages)
        return await self.inner._agenerate(inlined, stop=stop, run_manager=run_manager, **kwargs)


# -- the judge -----------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
# Pause before the second try; it doubles for each try after that.
RETRY_DELAY_S = 1.0
# Errors after which no call can succeed: asking again would only fail every criterion.
_FATAL = {"AuthenticationError", "PermissionDeniedError", "NotFoundError", "ModelAuthenticationError"}


def strip_thinking(text: str) -> str:
    """A reply without its <think> block (reasoning judges print one before the answer)."""
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


@dataclass
class Reply:
    value: Any
    raw: str
    tries: int


class Judge:
    """A chat model used as a judge: ``ask`` sends a prompt and returns the parsed answer.

    A call that raises (after the client's own retries) or times out, and a reply the parser
    cannot read, is tried again, up to ``attempts`` times in all, with a growing pause; then
    ``JudgeFailure``. At most ``concurrency`` calls run at once.
    """

    def __init__(
        self,
        model: BaseChatModel,
        *,
        identity: str | None = None,
        attempts: int = 3,
        timeout: float | None = 600.0,
        concurrency: int = 8,
        retry_delay: float | None = None,
        callbacks: Callbacks = None,
    ) -> None:
        if attempts < 1:
            raise ConfigurationError("the judge needs at least one attempt")
        if concurrency < 1:
            raise ConfigurationError("--judge-concurrency must be at least 1")
        self.model = model
        # With the server's address: judge caches and scores name the judge that answered.
        self.identity = identity or model_label(model)
        self.attempts = attempts
        self.timeout = timeout
        self.retry_delay = RETRY_DELAY_S if retry_delay is None else retry_delay
        self.callbacks = callbacks
        self._limit = asyncio.Semaphore(concurrency)
        self.calls = 0
        self.on_call: Callable[[], None] | None = None

    async def ask(
        self,
        prompt: JudgePrompt | Sequence[BaseMessage],
        parse: Callable[[str], Any],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """The parsed answer to ``prompt``; ``JudgeFailure`` when no try gives a readable one."""
        return (await self.reply(prompt, parse, metadata=metadata)).value

    async def reply(
        self,
        prompt: JudgePrompt | Sequence[BaseMessage],
        parse: Callable[[str], Any],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Reply:
        if isinstance(prompt, JudgePrompt):
            model: BaseChatModel = _InliningModel(
                inner=self.model, images={image.key: image for image in prompt.images()}
            )
            messages = prompt.to_messages()
        else:
            model, messages = self.model, list(prompt)
        replies: list[str] = []
        problem = ""
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry_delay * 2 ** (attempt - 2))
            try:
                async with self._limit:
                    self.calls += 1
                    if self.on_call is not None:
                        self.on_call()
                    call = model.ainvoke(
                        messages,
                        config={"callbacks": self.callbacks, "run_name": "judge",
                                "metadata": {"judge": self.identity, **(metadata or {})}},
                    )
                    message = await (asyncio.wait_for(call, self.timeout) if self.timeout else call)
            except asyncio.CancelledError:
                raise
            except ConfigurationError as exc:
                raise JudgeUnavailable(exc.message, hint=exc.hint) from exc
            except Exception as exc:
                if any(cls.__name__ in _FATAL for cls in type(exc).__mro__):
                    raise JudgeUnavailable(
                        f"the judge {self.identity} refused the request: {one_line(exc)}",
                        hint="check the judge's model name, URL and API key",
                    ) from exc
                problem = "timed out" if isinstance(exc, TimeoutError) else f"call failed: {one_line(exc)}"
                continue
            text = message.text if isinstance(message.text, str) else str(message.content)
            replies.append(text)
            try:
                return Reply(parse(strip_thinking(text)), text, attempt)
            except UnreadableReply as exc:
                problem = f"unreadable reply: {one_line(exc)}"
        raise JudgeFailure(f"no answer after {self.attempts} tries ({problem})", replies=replies)


def judge_chat_model(
    name: str,
    url: str | None = None,
    *,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    timeout: float = 600.0,
    max_retries: int = 2,
    extra_body: dict[str, Any] | None = None,
    device: str = "auto",
) -> BaseChatModel:
    """The judge's chat model: served when a URL or a ``provider:name`` is given (a vLLM server,
    OpenAI, Gemini through its LangChain package), else loaded in this process (transformers)."""
    if url or (re.match(r"^[a-z][a-z0-9_-]*:[^/\\]", name) and not Path(name).exists()):
        from interleave_thinker.models.served import served_chat_model

        return served_chat_model(
            name, base_url=url, timeout=timeout, max_retries=max_retries, temperature=temperature,
            max_tokens=max_tokens,
            # Server-side sampling fields are for OpenAI-compatible servers (vLLM) only.
            extra_body=extra_body if url else None,
        )
    try:
        from interleave_thinker.models.transformers_chat import TransformersChatModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            f"judge {name!r} would run in this process, which needs the transformers extra",
            hint="pip install 'interleave-thinker[transformers]', or pass --judge-url for a server",
        ) from exc
    return TransformersChatModel(
        model_name=name, device=device, dtype="auto", max_new_tokens=max_tokens or 2048,
        temperature=temperature, do_sample=temperature > 0,
    )


# -- the cache of verdicts -----------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str, limit: int = 60) -> str:
    readable = _SAFE.sub("-", text).strip("-.")[:limit] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass
class Verdict:
    """One criterion of one item: the judge's parsed answer, or why there is none."""

    item: str
    criterion: str
    ok: bool
    value: Any = None
    raw: str = ""
    error: str = ""
    cached: bool = False
    prompt: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "ok": self.ok, "value": self.value, "raw": self.raw,
                "error": self.error, "cached": self.cached}


class JudgeCache:
    """Verdicts on disk, one file per (item, criterion) under a folder per judge identity.

    A record is used again only when the prompt it answered is the one about to be sent
    (its digest is stored), so a changed answer or prompt is judged again. Failed calls are
    recorded too, and asked again by default.
    """

    def __init__(self, root: str | os.PathLike[str], identity: str) -> None:
        self.root = Path(root) / _slug(identity)
        self.identity = identity

    def path(self, item: str, criterion: str) -> Path:
        return self.root / _slug(item) / f"{_slug(criterion)}.json"

    def get(self, item: str, criterion: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(item, criterion).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def put(self, record: dict[str, Any]) -> None:
        path = self.path(record["item"], record["criterion"])
        write_atomically(path, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


async def ask_cached(
    judge: Judge,
    cache: JudgeCache | None,
    item: str,
    criterion: str,
    prompt: JudgePrompt,
    parse: Callable[[str], Any],
    *,
    retry_failed: bool = True,
) -> Verdict:
    """The verdict on one criterion: from the cache when the same prompt was answered, else asked."""
    digest = prompt.digest()
    described = prompt.describe()
    if cache is not None:
        stored = cache.get(item, criterion)
        if stored is not None and stored.get("request") == digest and (
            stored.get("status") == "ok" or not retry_failed
        ):
            return Verdict(item, criterion, stored.get("status") == "ok", stored.get("value"),
                           stored.get("raw", ""), stored.get("error", ""), True, described)
    try:
        reply = await judge.reply(prompt, parse, metadata={"item": item, "criterion": criterion})
        verdict = Verdict(item, criterion, True, reply.value, reply.raw, prompt=described)
    except JudgeFailure as exc:
        verdict = Verdict(item, criterion, False, raw=(exc.replies or [""])[-1], error=exc.message,
                          prompt=described)
    if cache is not None:
        cache.put({
            "item": item, "criterion": criterion, "judge": judge.identity, "request": digest,
            "status": "ok" if verdict.ok else "failed", "value": verdict.value, "raw": verdict.raw,
            "error": verdict.error, "time": time.time(),
        })
    return verdict
