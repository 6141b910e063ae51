"""Shared fixtures: run directories, scripted chat models and a recording generator."""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import Field

from interleave_thinker.checkpoints.postgres import mask_password
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


# --- PostgreSQL -------------------------------------------------------------------------------
#
# Every test that needs the server asks for ``postgres_url`` (directly, or through
# ``checkpointer_url`` or another fixture parametrised with ``checkpointer_params``). The rule:
# - INTERLEAVE_TEST_POSTGRES_URL unset or empty: the test is skipped, saying how to enable it;
# - set, but psycopg, psycopg_pool or langgraph-checkpoint-postgres cannot be imported, or the
#   server cannot be reached: the test fails (an error at set-up), so a run that was meant to
#   cover PostgreSQL cannot pass by skipping it;
# - otherwise the test gets a schema of its own on that server (via the URL's search_path),
#   dropped afterwards: it sees empty checkpoint tables and leaves nothing behind.

POSTGRES_URL_ENV = "INTERLEAVE_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = (
    f"PostgreSQL tests need a server: set {POSTGRES_URL_ENV}=postgresql://USER@HOST:5432/DATABASE "
    "(a database the user may create schemas in) to run them"
)
POSTGRES_MODULES = ("psycopg", "psycopg_pool", "langgraph.checkpoint.postgres.aio")
CHECKPOINTER_KINDS = ("memory", "sqlite", "postgres")
# Fixtures whose tests talk to the server; pytest_collection_modifyitems lets them reach it.
_POSTGRES_FIXTURES = {"postgres_server", "postgres_url"}


def postgres_test_hosts() -> list[str]:
    """The host of the test server's URL, for pytest-socket's allow_hosts marker."""
    host = urlsplit(os.environ.get(POSTGRES_URL_ENV, "")).hostname
    return [host or "127.0.0.1"]


def missing_postgres_modules() -> list[str]:
    """The PostgreSQL driver modules that cannot be imported, each with the reason."""
    missing = []
    for name in POSTGRES_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    return missing


def postgres_verdict(
    url: str | None, missing: Sequence[str] = (), connect_error: str | None = None
) -> tuple[Literal["skip", "fail"], str] | None:
    """What a test that needs PostgreSQL does: ("skip", why) when no server is named, ("fail",
    why) when one is named but the drivers are missing or it cannot be reached, None to run."""
    if not url:
        return "skip", POSTGRES_SKIP_REASON
    unset = f"(unset {POSTGRES_URL_ENV} to skip the PostgreSQL tests instead)"
    if missing:
        return "fail", (
            f"{POSTGRES_URL_ENV} is set, but the PostgreSQL driver cannot be imported: "
            f"{'; '.join(missing)}. Install it with pip install -e '.[postgres]' {unset}"
        )
    if connect_error is not None:
        return "fail", (
            f"{POSTGRES_URL_ENV} is set, but the server at {mask_password(url)} cannot be reached: "
            f"{connect_error} {unset}"
        )
    return None


def _obey(verdict: tuple[Literal["skip", "fail"], str] | None) -> None:
    if verdict is None:
        return
    action, why = verdict
    if action == "skip":
        pytest.skip(why)
    pytest.fail(why, pytrace=False)


def _postgres_conninfo(url: str) -> str:
    from interleave_thinker.checkpoints.postgres import parse_url

    return parse_url(url).conninfo


def _connect_error(url: str) -> str | None:
    """None when the server answers, else why not (on one line, without the password)."""
    import psycopg

    try:
        with psycopg.connect(_postgres_conninfo(url), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any reason at all is reported, none is skipped
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        password = urlsplit(url).password
        return text.replace(password, "***") if password else text
    return None


@pytest.fixture(scope="session")
def postgres_driver() -> None:
    """For tests that need the driver but no server: skipped without it, unless the variable
    is set (then PostgreSQL is meant to be covered, and they fail)."""
    url = os.environ.get(POSTGRES_URL_ENV, "")
    missing = missing_postgres_modules()
    if not missing:
        return
    if not url:
        pytest.skip(f"the PostgreSQL driver is not installed: {'; '.join(missing)}")
    _obey(postgres_verdict(url, missing))


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test server's URL, once checked: skips or fails every test that needs it, by the rule
    above (the outcome is kept for the whole session, so a dead server costs one timeout)."""
    url = os.environ.get(POSTGRES_URL_ENV, "")
    _obey(postgres_verdict(url, missing_postgres_modules() if url else ()))
    _obey(postgres_verdict(url, (), _connect_error(url)))
    return url


def with_search_path(url: str, schema: str) -> str:
    """The URL with ``-c search_path=SCHEMA`` added to its libpq ``options``."""
    parts = urlsplit(url)
    segments = [segment for segment in parts.query.split("&") if segment]
    options = [unquote(s.partition("=")[2]) for s in segments if s.partition("=")[0] == "options"]
    kept = [s for s in segments if s.partition("=")[0] != "options"]
    kept.append("options=" + quote(" ".join([*options, f"-csearch_path={schema}"]), safe=""))
    return urlunsplit(parts._replace(query="&".join(kept)))


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """The test server's URL with a new, empty schema of this test's own as its search_path;
    the schema and everything in it are dropped afterwards."""
    import psycopg

    schema = f"interleave_test_{uuid.uuid4().hex[:16]}"
    conninfo = _postgres_conninfo(postgres_server)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        try:
            admin.execute(f'CREATE SCHEMA "{schema}"')
        except psycopg.errors.InsufficientPrivilege as exc:
            pytest.fail(
                f"{POSTGRES_URL_ENV}: the user may not create schemas in "
                f"{mask_password(postgres_server)} ({exc}); GRANT CREATE ON DATABASE to it, "
                "or name a database it owns",
                pytrace=False,
            )
    try:
        yield with_search_path(postgres_server, schema)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            # Killed test processes may leave a session behind for a moment; wait, not forever.
            admin.execute("SET lock_timeout = '60s'")
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def checkpointer_params(*kinds: str) -> list[Any]:
    """pytest params for checkpointer kinds (by default memory, sqlite and postgres); the
    postgres one may reach the test server. Its fixture gets the URL from
    ``request.getfixturevalue("postgres_url")``, so that only that case needs the server."""
    postgres = pytest.mark.allow_hosts(postgres_test_hosts())
    return [pytest.param(kind, marks=postgres) if kind == "postgres" else kind
            for kind in kinds or CHECKPOINTER_KINDS]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that ask for the server directly may reach it through pytest-socket.
    for item in items:
        if _POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.allow_hosts(postgres_test_hosts()))


@pytest.fixture(params=checkpointer_params())
def checkpointer_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh checkpointer URL of each kind; a PostgreSQL one has a schema of its own."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/c.sqlite"
    return request.getfixturevalue("postgres_url")
