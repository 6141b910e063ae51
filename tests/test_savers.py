"""Checkpointer URLs: memory and SQLite savers, scheme registration, and the state serializer."""

from __future__ import annotations

import logging
import operator
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypedDict

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde import jsonplus
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel

from interleave_thinker.checkpoints import savers
from interleave_thinker.checkpoints.savers import (
    default_checkpointer_url,
    make_serializer,
    open_checkpointer,
    register_saver,
    sqlite_path,
)
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.state import (
    STATE_RECORD_TYPES,
    Attempt,
    BackendSpec,
    BackendSpecs,
    Budget,
    BuildSettings,
    Critique,
    Document,
    DocumentStep,
    ImageRef,
    Plan,
    Request,
    RunOptions,
    RunSettings,
    Step,
    StepProgress,
)

REF = ImageRef(sha256="c" * 64, media_type="image/png", width=8, height=6)


class Counter(TypedDict):
    count: int
    images: Annotated[list[ImageRef], operator.add]


def tiny_graph(saver: BaseCheckpointSaver):
    def bump(state: Counter) -> dict:
        return {"count": state["count"] + 1, "images": [REF]}

    builder = StateGraph(Counter)
    builder.add_node("bump", bump)
    builder.add_edge(START, "bump")
    builder.add_edge("bump", END)
    return builder.compile(checkpointer=saver)


def config(thread_id: str) -> dict:
    return {"configurable": {"thread_id": thread_id}}


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the built-in schemes and fresh memory savers; its changes are undone."""
    monkeypatch.setattr(savers, "_FACTORIES", dict(savers._FACTORIES))
    monkeypatch.setattr(savers, "_MEMORY_SAVERS", {})
    yield


async def test_memory_url_gives_the_same_saver_across_openings() -> None:
    async with open_checkpointer("memory://run") as first:
        assert isinstance(first, InMemorySaver)
        await tiny_graph(first).ainvoke({"count": 0, "images": []}, config("t"))
    async with open_checkpointer("memory://run") as second:
        assert second is first
        state = await tiny_graph(second).aget_state(config("t"))
        assert state.values == {"count": 1, "images": [REF]}
    async with open_checkpointer("memory://other") as other:
        assert other is not first
        assert (await tiny_graph(other).aget_state(config("t"))).values == {}


async def test_sqlite_creates_file_and_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "checkpoints.sqlite"
    async with open_checkpointer(f"sqlite:///{path}") as saver:
        assert isinstance(saver, BaseCheckpointSaver)
    assert path.is_file()


async def test_sqlite_graph_state_survives_a_reopening(tmp_path: Path) -> None:
    url = default_checkpointer_url(tmp_path / "run")
    async with open_checkpointer(url) as saver:
        result = await tiny_graph(saver).ainvoke({"count": 41, "images": []}, config("t1"))
        assert result == {"count": 42, "images": [REF]}
    async with open_checkpointer(url) as saver:
        graph = tiny_graph(saver)
        state = await graph.aget_state(config("t1"))
        assert state.values == {"count": 42, "images": [REF]}
        assert type(state.values["images"][0]) is ImageRef
        # Resuming the thread continues from the stored state.
        result = await graph.ainvoke({"count": state.values["count"]}, config("t1"))
        assert result == {"count": 43, "images": [REF, REF]}
        assert (await graph.aget_state(config("other"))).values == {}


async def test_sqlite_aput_then_aget_tuple_across_openings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"ref": REF}
    checkpoint["channel_versions"] = {"ref": 1}
    async with open_checkpointer(url) as saver:
        stored = await saver.aput(
            {"configurable": {"thread_id": "t", "checkpoint_ns": ""}},
            checkpoint, {"source": "input", "step": -1}, {"ref": 1},
        )
    async with open_checkpointer(url) as saver:
        loaded = await saver.aget_tuple(stored)
        assert loaded is not None
        assert loaded.checkpoint["id"] == checkpoint["id"]
        assert loaded.checkpoint["channel_values"] == {"ref": REF}
        assert await saver.aget_tuple(config("missing")) is None


def test_sqlite_path_accepts_relative_and_absolute_paths() -> None:
    assert sqlite_path("sqlite:///runs/c.sqlite") == Path("runs/c.sqlite")
    assert sqlite_path("sqlite:////tmp/c.sqlite") == Path("/tmp/c.sqlite")
    url = default_checkpointer_url(Path("runs"))
    assert url.startswith("sqlite:////")
    assert sqlite_path(url) == (Path("runs") / "checkpoints.sqlite").resolve()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:", "sqlite://host/x.db"])
async def test_sqlite_url_without_path_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="no file path") as info:
        async with open_checkpointer(url):
            pass
    assert "sqlite:///" in info.value.hint


@pytest.mark.parametrize("url", ["redis://x", "file:///x", "", "/plain/path"])
def test_unknown_scheme_lists_known_schemes(url: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme") as info:
        open_checkpointer(url)
    assert "memory" in info.value.hint
    assert "sqlite" in info.value.hint


async def test_register_saver_adds_a_scheme() -> None:
    opened: list[str] = []
    fake = InMemorySaver()

    @asynccontextmanager
    async def open_fake(url: str) -> AsyncIterator[BaseCheckpointSaver]:
        opened.append(url)
        yield fake

    register_saver("fake", open_fake)
    async with open_checkpointer("fake://db/name") as saver:
        assert saver is fake
        await tiny_graph(saver).ainvoke({"count": 0, "images": []}, config("t"))
    assert opened == ["fake://db/name"]
    assert (await tiny_graph(fake).aget_state(config("t"))).values["count"] == 1
    with pytest.raises(ConfigurationError) as info:
        open_checkpointer("other://x")
    assert "fake" in info.value.hint


def test_registered_scheme_is_gone_after_its_test() -> None:
    # The autouse fixture restored the registry after test_register_saver_adds_a_scheme.
    assert "fake" not in savers._FACTORIES
    assert {"memory", "sqlite"} <= set(savers._FACTORIES)


def one_of_each_record() -> list[BaseModel]:
    critique = Critique(success=False, refine_prompt="brighter", reasoning="dim", score=0.25)
    attempt = Attempt(step=1, number=2, prompt="a fox", seed=3, image=REF, critique=critique,
                      reused=True, started_at=1.5, generation_seconds=0.5)
    step = Step(number=1, name="fox", instruction="draw", prompt="a fox", text="A fox.",
                sources=("input:1",))
    request = Request(text="a fox story", images=(REF,))
    budget = Budget(max_attempts=4, selection="best")
    options = RunOptions(budget=budget, seed=9, width=64, height=32)
    document_step = DocumentStep(number=1, name="fox", text="A fox.", instruction="draw",
                                 status="accepted", image=REF, attempts=(attempt,))
    served = BackendSpec(kind="served", model="p", base_url="http://127.0.0.1:8000/v1")
    build = BuildSettings(temperature=0.5, steps=4)
    specs = BackendSpecs(planner=served, critic=served, generator=BackendSpec(kind="diffusers", model="g"),
                         build=build)
    return [
        REF,
        request,
        step,
        Plan(steps=(step, Step(number=2))),
        critique,
        attempt,
        StepProgress(number=1, status="accepted", attempts=(attempt,), chosen=0),
        budget,
        options,
        RunSettings(profile="test", planner="p", critic="c", generator="g", options=options),
        served,
        build,
        specs,
        RunSettings(profile="default", planner="p", critic="c", generator="g", backends=specs),
        document_step,
        Document(request=request, steps=(document_step,), profile="test", generator_calls=2),
    ]


def test_sample_covers_every_state_record_type() -> None:
    assert {type(record) for record in one_of_each_record()} == set(STATE_RECORD_TYPES)


@pytest.mark.parametrize("record", one_of_each_record(), ids=lambda r: type(r).__name__)
def test_serializer_round_trips_state_records_without_warnings(
    record: BaseModel, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LangGraph warns once per type per process; forget earlier warnings so none is hidden.
    monkeypatch.setattr(jsonplus, "_warned_unregistered_types", set(), raising=False)
    monkeypatch.setattr(jsonplus, "_warned_blocked_types", set(), raising=False)
    serde = make_serializer()
    with caplog.at_level(logging.WARNING, logger="langgraph"):
        loaded = serde.loads_typed(serde.dumps_typed(record))
        nested = serde.loads_typed(serde.dumps_typed({"records": [record], "tuple": (record,)}))
    assert type(loaded) is type(record)
    assert loaded == record
    assert type(nested["records"][0]) is type(record)
    assert nested["records"][0] == record
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_default_serializer_would_not_restore_records_silently(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards the test above: with no allow-list LangGraph does complain (or block) for our types.
    monkeypatch.setattr(jsonplus, "_warned_unregistered_types", set(), raising=False)
    monkeypatch.setattr(jsonplus, "_warned_blocked_types", set(), raising=False)
    strict = jsonplus.JsonPlusSerializer(allowed_msgpack_modules=None)
    with caplog.at_level(logging.WARNING, logger="langgraph"):
        loaded = strict.loads_typed(strict.dumps_typed(REF))
    assert type(loaded) is not ImageRef
    assert any("ImageRef" in r.getMessage() for r in caplog.records)
