"""LangChain messages as a chat-template conversation plus the images it shows, decoded inline."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from PIL import Image

__all__ = ["to_conversation"]

_ROLES: dict[type[BaseMessage], str] = {
    SystemMessage: "system",
    HumanMessage: "user",
    AIMessage: "assistant",
    ToolMessage: "tool",
}


def to_conversation(messages: Sequence[BaseMessage]) -> tuple[list[dict], list[Image.Image]]:
    """Chat-template messages (images as placeholders, in order) and the decoded images."""
    conversation: list[dict] = []
    images: list[Image.Image] = []
    for index, message in enumerate(messages):
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(type(message))
        if role is None:
            # Subclasses (e.g. AIMessageChunk) map like their base class.
            role = next((r for kind, r in _ROLES.items() if isinstance(message, kind)), None)
        if role is None:
            raise ValueError(f"message {index}: {type(message).__name__} is not supported")
        content = message.content
        parts: list[dict] = []
        for block in [content] if isinstance(content, str) else content:
            if isinstance(block, str):
                parts.append({"type": "text", "text": block})
                continue
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind in ("image", "image_url"):
                images.append(_decode_image(block, where=f"message {index}"))
                parts.append({"type": "image"})
            else:
                raise ValueError(
                    f"message {index}: content blocks of type {kind!r} are not supported "
                    "(only text and images)"
                )
        if all(part["type"] == "text" for part in parts):
            # Plain strings suit every template, including text-only ones; Qwen's templates
            # join text parts without a separator too.
            conversation.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            conversation.append({"role": role, "content": parts})
    return conversation, images


def _decode_image(block: Mapping[str, Any], *, where: str) -> Image.Image:
    """A PIL image from a standard image block (base64) or an OpenAI ``image_url`` data URL."""
    if block.get("type") == "image_url":
        spec = block.get("image_url")
        url = spec.get("url") if isinstance(spec, Mapping) else spec
        data = _data_url_payload(url, where=where)
    elif block.get("base64") or block.get("source_type") == "base64":
        data = block.get("base64") or block.get("data")
    elif block.get("url") or block.get("source_type") == "url":
        data = _data_url_payload(block.get("url"), where=where)
    else:
        raise ValueError(f"{where}: an image block needs inline data ('base64' or a data: URL)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: the image could not be decoded: {error}") from None
    return image


def _data_url_payload(url: object, *, where: str) -> str:
    if not isinstance(url, str):
        raise ValueError(f"{where}: the image URL must be a string")
    if url.startswith(("http://", "https://")):
        raise ValueError(
            f"{where}: image URLs over http(s) are refused: the transformers chat model never "
            "fetches anything. Send the image inline as base64 (a standard image block or a "
            "data: URL)."
        )
    header, comma, payload = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise ValueError(f"{where}: unsupported image URL {url[:40]!r}; use a base64 data: URL")
    return payload
