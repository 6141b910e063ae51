"""Shared fixtures: run directories, scripted chat models and a recording generator."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import Field

from interleave_thinker.context import Backends
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.generators.stand_in import StandInImageGenerator
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.state import RunOptions


class ScriptedChatModel(BaseChatModel):
    """A chat model whose reply is computed by a test function; it records every call."""

    reply: Callable[[list[BaseMessage]], str]
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    call_kwargs: list[dict[str, Any]] = Field(default_factory=list)
    name_for_identity: str = "scripted"

    @property
    def _llm_type(self) -> str:
        return self.name_for_identity

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.calls.append(list(messages))
        self.call_kwargs.append(kwargs)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self.reply(messages)))])


def scripted(reply: Callable[[list[BaseMessage]], str] | Sequence[str], name: str = "scripted"
             ) -> ScriptedChatModel:
    """A scripted model from a function of the messages, or from a list of replies in order."""
    if callable(reply):
        return ScriptedChatModel(reply=reply, calls=[], name_for_identity=name)
    replies = list(reply)

    def next_reply(_: list[BaseMessage]) -> str:
        if not replies:
            raise AssertionError("scripted model ran out of replies")
        return replies.pop(0)

    return ScriptedChatModel(reply=next_reply, calls=[], name_for_identity=name)


class RecordingGenerator(StandInImageGenerator):
    """The test generator, also keeping every job it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[GenerationJob] = []

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        self.jobs.extend(jobs)
        return await super().agenerate(jobs)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def small() -> RunOptions:
    """Small images keep the tests fast; everything else is the default."""
    return RunOptions(width=64, height=64)


@pytest.fixture
def test_backends() -> Backends:
    return Backends(
        planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=RecordingGenerator()
    )


POSTGRES_URL_ENV = "INTERLEAVE_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = (
    f"PostgreSQL tests need a server: set {POSTGRES_URL_ENV}=postgresql://USER@HOST:5432/DATABASE "
    "(a database the user may create tables in) to run them"
)


def postgres_test_hosts() -> list[str]:
    """The host of the test server's URL, for pytest-socket's allow_hosts marker."""
    host = urlsplit(os.environ.get(POSTGRES_URL_ENV, "")).hostname
    return [host or "127.0.0.1"]


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.allow_hosts(postgres_test_hosts())),
    ]
)
def checkpointer_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh checkpointer URL of each kind; PostgreSQL ones share the server's database, so
    tests that use it must pick unique thread ids."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/c.sqlite"
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(POSTGRES_SKIP_REASON)
    return url
