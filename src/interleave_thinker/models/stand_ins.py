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

# The test planner never writes more steps than this, whatever the request's length.
MAX_TEST_STEPS = 6

_PART_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


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


def split_request(text: str) -> list[str]:
    """Sentences, clauses after ';' and lines of the request: one part per test step."""
    parts = [part.strip(" \t.;") for part in _PART_SPLIT.split(text)]
    parts = [part for part in parts if part]
    if len(parts) > MAX_TEST_STEPS:
        # Fold the overflow into the last step rather than dropping what the user wrote.
        parts = [*parts[: MAX_TEST_STEPS - 1], "; ".join(parts[MAX_TEST_STEPS - 1 :])]
    return parts


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
        for offset, part in enumerate(split_request(request) or [request.strip()]):
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
