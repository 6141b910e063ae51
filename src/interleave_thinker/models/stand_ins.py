"""Planner and critic stand-ins for tests and smoke runs: rule-based, printing the real tagged format."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict

from interleave_thinker.prompts.packs import InterleavePack, PromptPack

# The test planner writes one step per part of the request, and never more than this (a
# 10,000-character request could have a thousand parts); fewer when the planner prompt sets a
# step limit (--max-steps), which it reads as a real planner would.
MAX_TEST_STEPS = 100

_PART_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")
# How our planner prompt states --max-steps (prompts/templates.py).
_STEP_LIMIT = re.compile(r"Write at most (\d+) steps")


class _RuleBasedChatModel(BaseChatModel):
    """A chat model whose reply is a pure function of the messages.

    ``prompts`` is the pack whose messages it reads (ours unless set): a stand-in has no
    language skills, it finds the request and prompts by the pack's layout.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompts: PromptPack | None = None

    @property
    def pack(self) -> PromptPack:
        return self.prompts or InterleavePack()

    def _reply(self, messages: Sequence[BaseMessage]) -> str:
        raise NotImplementedError

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self._reply(messages)))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop)


def split_request(text: str, max_steps: int = MAX_TEST_STEPS) -> list[str]:
    """Sentences, clauses after ';' and lines of the request: one part per test step, at most
    ``max_steps`` (the overflow is folded into the last step rather than dropped)."""
    parts = [part.strip(" \t.;") for part in _PART_SPLIT.split(text)]
    parts = [part for part in parts if part]
    limit = max(1, min(max_steps, MAX_TEST_STEPS))
    if len(parts) > limit:
        parts = [*parts[: limit - 1], "; ".join(parts[limit - 1 :])]
    return parts


def _step_limit(messages: Sequence[BaseMessage]) -> int:
    """The step limit the planner prompt states (--max-steps), else MAX_TEST_STEPS."""
    for message in messages:
        texts = [message.content] if isinstance(message.content, str) else [
            block.get("text", "") for block in message.content if isinstance(block, dict)
        ]
        for text in texts:
            found = _STEP_LIMIT.search(text) if isinstance(text, str) else None
            if found:
                return int(found.group(1))
    return MAX_TEST_STEPS


class StandInPlannerModel(_RuleBasedChatModel):
    """Splits the request into steps; a part ending in '?' becomes a text-only answer step."""

    __test__ = False

    @property
    def _llm_type(self) -> str:
        return "interleave-test-planner"

    def _reply(self, messages: Sequence[BaseMessage]) -> str:
        request = self.pack.request_from_messages(messages)
        if request is None:
            raise ValueError(f"test planner: no request in the messages ({self.pack.name} layout)")
        # In guidance mode the user's images are steps 1..N, so the plan continues at N+1.
        first_number = _image_block_count(messages) + 1
        steps: list[dict[str, Any]] = []
        drawn_any = False
        parts = split_request(request, _step_limit(messages)) or [request.strip()]
        for offset, part in enumerate(parts):
            question = part.endswith("?")
            if question:
                prompt = None
                aux = f"(test planner) A text answer to: {part}"
            elif drawn_any or first_number > 1:
                prompt = f"Edit the previous image: {part}"
                aux = None
            else:
                prompt = part
                aux = None
            drawn_any = drawn_any or prompt is not None
            steps.append(
                {
                    "step_number": first_number + offset,
                    "step_name": " ".join(part.split()[:4]),
                    "instruction": part,
                    "prompt": prompt,
                    "auxiliary_text": aux,
                }
            )
        # Python repr, single quotes and None: what the released planner prints, on purpose.
        return (
            f"<think>The test planner split the request into {len(steps)} parts.</think>\n"
            f"<answer>{ {'execution_plan': steps}!r}</answer>"
        )


class StandInCriticModel(_RuleBasedChatModel):
    """Rejects the first attempt of roughly half of the steps (chosen by a hash of the prompt).

    An attempt is rejected when it used the planned prompt unchanged and the planned prompt's
    sha256 starts with an even byte; the refined prompt it proposes is then accepted.
    """

    __test__ = False

    @property
    def _llm_type(self) -> str:
        return "interleave-test-critic"

    def _reply(self, messages: Sequence[BaseMessage]) -> str:
        prompts = self.pack.prompts_from_messages(messages)
        if prompts is None:
            raise ValueError(
                f"test critic: no planned/used prompts in the messages ({self.pack.name} layout)"
            )
        images = _image_block_count(messages)
        if images != 2:
            raise ValueError(f"test critic: expected the previous and candidate image, got {images}")
        planned, used = prompts
        reject = used == planned and hashlib.sha256(planned.encode()).digest()[0] % 2 == 0
        if reject:
            verdict = {
                "previous_step_success": False,
                "refine_prompt": f"{planned}, with sharper detail",
                "score": 3,
            }
            thought = "The test critic rejects this first attempt by its rule."
        else:
            verdict = {"previous_step_success": True, "refine_prompt": None, "score": 8}
            thought = "The test critic accepts this attempt by its rule."
        return f"<think>{thought}</think>\n<answer>{verdict!r}</answer>"


def _image_block_count(messages: Sequence[BaseMessage]) -> int:
    for message in messages:
        if isinstance(message, HumanMessage) and isinstance(message.content, list):
            return sum(
                1
                for block in message.content
                if isinstance(block, dict) and block.get("type") in ("image", "image_url")
            )
    return 0
