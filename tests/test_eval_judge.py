"""The judge layer on its own: retries, failures that are never scores, the cache, the trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, HumanMessage

from conftest import scripted
from eval_fixtures import HOST, judge_server, picture
from interleave_thinker.evaluation import judge as judge_module
from interleave_thinker.evaluation.judge import (
    Judge,
    JudgeCache,
    JudgeFailure,
    JudgePrompt,
    JudgeUnavailable,
    UnreadableReply,
    ask_cached,
    image_input,
    judge_chat_model,
    system,
    user,
)


def parse_yes(text: str) -> bool:
    if text.strip() not in ("yes", "no"):
        raise UnreadableReply(text)
    return text.strip() == "yes"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import openai._base_client as base_client

    monkeypatch.setattr(judge_module, "RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(base_client, "INITIAL_RETRY_DELAY", 0.001)
    monkeypatch.setattr(base_client, "MAX_RETRY_DELAY", 0.002)


async def test_a_reply_is_asked_again_until_readable_and_thinking_is_dropped() -> None:
    model = scripted(["hmm, unsure", "<think>maybe no</think>\nyes"])
    judge = Judge(model, attempts=3)
    # Plain LangChain messages work too (what a training reward sends).
    assert await judge.ask([HumanMessage("Is it a cat?")], parse_yes) is True
    assert judge.calls == 2 and len(model.calls) == 2


async def test_unreadable_replies_fail_after_the_tries() -> None:
    judge = Judge(scripted(lambda _: "perhaps"), attempts=2)
    with pytest.raises(JudgeFailure) as info:
        await judge.ask([HumanMessage("?")], parse_yes)
    assert "2 tries" in info.value.message and info.value.replies == ["perhaps", "perhaps"]


@pytest.mark.allow_hosts([HOST])
async def test_server_errors_become_a_recorded_failure_never_a_score(tmp_path: Path) -> None:
    with judge_server(lambda body: (500, "overloaded")) as server:
        judge = Judge(judge_chat_model("m", server.url, max_retries=1), attempts=2)
        cache = JudgeCache(tmp_path, judge.identity)
        prompt = JudgePrompt.of(user("Is it a cat?"))
        verdict = await ask_cached(judge, cache, "item-1", "c", prompt, parse_yes)
        # The SDK's own retry (1) under each of our two tries.
        assert len(server.requests) == 4
    assert not verdict.ok and verdict.value is None and "500" in verdict.error
    record = cache.get("item-1", "c")
    assert record["status"] == "failed" and record["value"] is None


@pytest.mark.allow_hosts([HOST])
async def test_a_refused_key_stops_the_judge() -> None:
    with judge_server(lambda body: (401, "bad key")) as server:
        judge = Judge(judge_chat_model("m", server.url), attempts=3)
        with pytest.raises(JudgeUnavailable):
            await judge.ask(JudgePrompt.of(user("?")), parse_yes)
        assert len(server.requests) == 1


async def test_the_cache_is_per_judge_and_per_prompt(tmp_path: Path) -> None:
    first = Judge(scripted(lambda _: "yes", name="judge-a"))
    prompt = JudgePrompt.of(system("Grade."), user("Is it a cat?"))
    cache = JudgeCache(tmp_path, first.identity)
    assert (await ask_cached(first, cache, "i", "c", prompt, parse_yes)).cached is False
    again = await ask_cached(first, cache, "i", "c", prompt, parse_yes)
    assert again.cached and again.value is True and first.calls == 1
    changed = JudgePrompt.of(system("Grade."), user("Is it a dog?"))
    assert (await ask_cached(first, cache, "i", "c", changed, parse_yes)).cached is False
    other = Judge(scripted(lambda _: "no", name="judge-b"))
    verdict = await ask_cached(other, JudgeCache(tmp_path, other.identity), "i", "c", changed, parse_yes)
    assert verdict.cached is False and verdict.value is False


class _Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[list[BaseMessage]] = []

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, **kwargs: Any) -> None:
        self.seen += messages


async def test_images_reach_the_model_but_never_the_trace(tmp_path: Path) -> None:
    path = picture(tmp_path / "p.png", size=900)
    model = scripted(lambda _: "yes")
    recorder = _Recorder()
    judge = Judge(model, callbacks=[recorder])
    image = image_input(path, max_side=512, format="JPEG")
    await judge.ask(JudgePrompt.of(user("Is it red?", image)), parse_yes)
    traced = str(recorder.seen)
    assert "base64" not in traced and image.sha256 in traced
    sent = model.calls[0][0].content
    block = next(part for part in sent if part.get("type") == "image")
    assert block["mime_type"] == "image/jpeg" and len(block["base64"]) > 100
