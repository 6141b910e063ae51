"""Prompt packs: the prompts and message layout a planner and a critic get, chosen per run.

Two packs exist. ``interleave`` is this project's own wording (a system message, marked request
and prompts), used for every model that is not an InterleaveThinker checkpoint. ``official``
rebuilds, from the user's clone of the official repository, exactly the single user turn the
released checkpoints were trained on. A thread records its pack's identity, so a resume cannot
silently switch wording.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.models.messages import image_block
from interleave_thinker.prompts import templates
from interleave_thinker.prompts.official import (
    FETCH_COMMAND,
    OfficialTemplates,
    read_official_templates,
    recorded_clone,
)
from interleave_thinker.state import Attempt, ImageRef, Step

What = Literal["plan", "verdict"]

INTERLEAVE = "interleave"
OFFICIAL = "official"
PROMPTS_ENV = "INTERLEAVE_PROMPTS"
# The official UEval script drops this phrase from every request before planning.
_OFFICIAL_DROPPED_PHRASE = " both visually and textually"
_IMAGE_PLACEHOLDER = re.compile(r"(?i)<image>")
# The official guidance layout shrinks images when a request carries this many or more.
OFFICIAL_MANY_IMAGES = 5
OFFICIAL_MAX_PIXELS = 384 * 384


class PromptPackWarning(UserWarning):
    """A run uses other prompts than the ones its models were trained on."""


class PromptPack(ABC):
    """What a planner and a critic are sent, and how an unreadable reply is asked again."""

    name: str
    # Unreadable replies: True samples again from the same input, False shows the model its
    # reply with the problem (a re-ask inside the conversation).
    resample_unreadable: bool = False
    # max_new_tokens for planner and critic unless the user sets it.
    default_max_new_tokens: int = 2048

    @property
    @abstractmethod
    def identity(self) -> str:
        """What a thread records: the pack's name and, for read-in text, a digest of it."""

    @abstractmethod
    def planner_messages(
        self, text: str, image_blocks: Sequence[dict], *, max_steps: int | None
    ) -> list[BaseMessage]:
        """The planner's input for a request text and its input images (guidance mode if any)."""

    @abstractmethod
    def critic_messages(
        self,
        *,
        step_name: str,
        instruction: str,
        planned_prompt: str,
        used_prompt: str,
        previous_image: dict,
        candidate_image: dict,
    ) -> list[BaseMessage]:
        """The critic's input for one attempt: previous image, candidate, both prompts."""

    def attempt_messages(self, step: Step, attempt: Attempt, previous: ImageRef) -> list[BaseMessage]:
        """The critic's question about ``attempt`` of ``step``; ``previous`` is the image the step
        edits, or the blank canvas before the first image. The critic node and the training
        export both build it here, so training and inference inputs cannot drift apart."""
        return self.critic_messages(
            step_name=step.name,
            instruction=step.instruction,
            planned_prompt=step.prompt or "",
            used_prompt=attempt.prompt,
            previous_image=image_block(previous),
            candidate_image=image_block(attempt.image),
        )

    @abstractmethod
    def reask_message(self, error: str, *, what: What) -> HumanMessage | None:
        """The message that asks again after an unreadable reply; None means sample again."""

    @abstractmethod
    def request_from_messages(self, messages: Sequence[BaseMessage]) -> str | None:
        """The request text inside planner messages this pack built (for rule-based stand-ins)."""

    @abstractmethod
    def prompts_from_messages(self, messages: Sequence[BaseMessage]) -> tuple[str, str] | None:
        """The (planned, used) prompts inside critic messages this pack built."""


class InterleavePack(PromptPack):
    """This project's own prompts: a system message, then the images and the marked request."""

    name = INTERLEAVE

    @property
    def identity(self) -> str:
        # Our wording changes with the code, like every other part of it.
        return INTERLEAVE

    def planner_messages(
        self, text: str, image_blocks: Sequence[dict], *, max_steps: int | None
    ) -> list[BaseMessage]:
        return templates.planner_messages(text, image_blocks, max_steps=max_steps)

    def critic_messages(self, **fields: Any) -> list[BaseMessage]:
        return templates.critic_messages(**fields)

    def reask_message(self, error: str, *, what: What) -> HumanMessage | None:
        return templates.reask_message(error, what=what)

    def request_from_messages(self, messages: Sequence[BaseMessage]) -> str | None:
        return templates.request_from_messages(messages)

    def prompts_from_messages(self, messages: Sequence[BaseMessage]) -> tuple[str, str] | None:
        return templates.prompts_from_messages(messages)


class OfficialPack(PromptPack):
    """The official UEval layout: no system message, one user turn, templates filled with
    ``str.replace`` exactly as the official scripts fill them."""

    name = OFFICIAL
    resample_unreadable = True
    # The official inference helper generates up to 4096 new tokens.
    default_max_new_tokens = 4096

    def __init__(self, texts: OfficialTemplates) -> None:
        self.texts = texts
        canonical = json.dumps([texts.narrative, texts.guidance, texts.critic])
        self.digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def identity(self) -> str:
        # The text decides, not where the clone lies: two clones of one version are one pack.
        return f"{OFFICIAL}:{self.digest[:16]}"

    @property
    def source(self) -> Path:
        return self.texts.source

    def planner_messages(
        self, text: str, image_blocks: Sequence[dict], *, max_steps: int | None
    ) -> list[BaseMessage]:
        # The official templates never mention a step limit; a cap, if set, is checked on parsing.
        text = text.replace(_OFFICIAL_DROPPED_PHRASE, "")
        if not image_blocks:
            filled = self.texts.narrative.replace("{text_input}", text)
            return [HumanMessage(content=[{"type": "text", "text": filled}])]
        filled = self.texts.guidance.replace("{text_input}", text)
        missing = len(image_blocks) - len(_IMAGE_PLACEHOLDER.findall(filled))
        if missing > 0:
            # The official code puts image i after text part i and drops images beyond the
            # placeholders; a request without them gets them in front, so no image is lost.
            filled = self.texts.guidance.replace("{text_input}", "<image>" * missing + text)
        return [HumanMessage(content=_interleave_images(filled, image_blocks))]

    def critic_messages(
        self,
        *,
        step_name: str,
        instruction: str,
        planned_prompt: str,
        used_prompt: str,
        previous_image: dict,
        candidate_image: dict,
    ) -> list[BaseMessage]:
        filled = self.texts.critic.replace("{original_instruction}", planned_prompt).replace(
            "{rewritten_prompt}", used_prompt
        )
        content = [dict(previous_image), dict(candidate_image), {"type": "text", "text": filled}]
        return [HumanMessage(content=content)]

    def reask_message(self, error: str, *, what: What) -> HumanMessage | None:
        return None

    def request_from_messages(self, messages: Sequence[BaseMessage]) -> str | None:
        for text in _user_texts(messages):
            for template in (self.texts.narrative, self.texts.guidance):
                found = _unfill(template, ("{text_input}",), text)
                if found is not None:
                    return found[0]
        return None

    def prompts_from_messages(self, messages: Sequence[BaseMessage]) -> tuple[str, str] | None:
        slots = ("{original_instruction}", "{rewritten_prompt}")
        for text in _user_texts(messages):
            found = _unfill(self.texts.critic, slots, text)
            if found is not None:
                return found[0], found[1]
        return None


def _interleave_images(filled: str, image_blocks: Sequence[dict]) -> list[dict]:
    """Text split at each ``<image>`` with image i after text part i, as the official code does."""
    shrink = len(image_blocks) >= OFFICIAL_MANY_IMAGES
    content: list[dict] = []
    for index, part in enumerate(_IMAGE_PLACEHOLDER.split(filled)):
        if part:
            content.append({"type": "text", "text": part})
        if index < len(image_blocks):
            block = dict(image_blocks[index])
            if shrink:
                block["max_pixels"] = OFFICIAL_MAX_PIXELS
            content.append(block)
    return content


def _user_texts(messages: Sequence[BaseMessage]) -> list[str]:
    """Each user message's text, newest first, with ``<image>`` where an image part was."""
    texts = []
    for message in reversed(messages):
        if not isinstance(message, HumanMessage):
            continue
        content = message.content
        if isinstance(content, str):
            texts.append(content)
            continue
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            else:
                pieces.append("<image>")
        texts.append("".join(pieces))
    return texts


def _unfill(template: str, slots: Sequence[str], text: str) -> list[str] | None:
    """The values that, put into ``template``'s slots, give ``text`` (None when it does not fit)."""
    pattern = re.escape(template)
    for slot in slots:
        pattern = pattern.replace(re.escape(slot), "(.*?)", 1)
    # Image parts were joined back as <image>; a text without them is compared as it is.
    match = re.fullmatch(pattern, text, re.DOTALL)
    if match is None and "<image>" in text:
        match = re.fullmatch(pattern, _IMAGE_PLACEHOLDER.sub("", text), re.DOTALL)
    return None if match is None else list(match.groups())


# ---------------------------------------------------------------------------------------------
# Choosing a pack


def is_interleave_checkpoint(model: str | None) -> bool:
    """Whether a model name or path names one of the released InterleaveThinker checkpoints."""
    return bool(model) and "interleavethinker" in str(model).lower().replace("-", "").replace("_", "")


_warned = False


def resolve_prompt_pack(spec: str | None, *, planner: str | None = None, critic: str | None = None
                        ) -> PromptPack:
    """The pack a spec names: ``interleave``, ``official`` (the fetched clone), ``official:PATH``,
    or None/``auto``: the official pack for InterleaveThinker checkpoints when a clone was
    fetched, else ours (with one warning when the checkpoints will not get their own prompts)."""
    chosen = (spec or "auto").strip()
    if chosen == INTERLEAVE:
        return InterleavePack()
    if chosen.startswith(f"{OFFICIAL}:"):
        return OfficialPack(read_official_templates(chosen.split(":", 1)[1]))
    if chosen == OFFICIAL:
        clone = recorded_clone()
        if clone is None:
            raise ConfigurationError(
                "the official prompt pack was asked for, but no clone of the official repository "
                "was fetched",
                hint=f"run `{FETCH_COMMAND}` once, or pass --prompts official:PATH to your own clone",
            )
        return OfficialPack(read_official_templates(clone))
    if chosen != "auto":
        raise ConfigurationError(
            f"unknown prompt pack {spec!r}",
            hint="use interleave, official, official:PATH (a clone of the official repository) or auto",
        )
    if not (is_interleave_checkpoint(planner) or is_interleave_checkpoint(critic)):
        return InterleavePack()
    clone = recorded_clone()
    if clone is not None:
        return OfficialPack(read_official_templates(clone))
    _warn_once(
        "the InterleaveThinker checkpoints were trained on the official prompts, which are not "
        f"available here; using this project's own prompts instead. Run `{FETCH_COMMAND}` once "
        "to use theirs."
    )
    return InterleavePack()


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, PromptPackWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# What a model gets, as plain JSON (``interleave prompts show``)


def messages_as_json(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """``[{"role", "content": [parts]}]`` with text parts ``{"type": "text", "text"}`` and image
    parts as they were built (``{"type": "image", ...}``, with ``max_pixels`` when set)."""
    roles = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}
    out = []
    for message in messages:
        role = next((name for kind, name in roles.items() if isinstance(message, kind)), message.type)
        content = message.content
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [
            {"type": "text", "text": part} if isinstance(part, str) else dict(part) for part in content
        ]
        out.append({"role": role, "content": parts})
    return out
