"""LangGraph's checkpointer conformance suite on every saver we ship, and our records under strict msgpack."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from conftest import checkpointer_params
from interleave_thinker.checkpoints.savers import open_checkpointer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("langgraph.checkpoint.conformance") is None,
    reason="langgraph-checkpoint-conformance is not installed (pip install -e '.[test]')",
)

UrlFactory = Callable[[], str]


@pytest.fixture(params=checkpointer_params())
def saver_urls(request: pytest.FixtureRequest, tmp_path: Path) -> UrlFactory:
    """A new checkpointer URL per call: the suite wants a fresh saver for each capability, or the
    list tests would count another capability's checkpoints."""
    if request.param == "memory":
        return lambda: f"memory://conformance-{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path}/conformance-{uuid.uuid4().hex}.sqlite"
    # One schema for every suite of this test: the suite itself uses fresh thread ids.
    url = request.getfixturevalue("postgres_url")
    return lambda: url


async def test_shipped_saver_passes_the_base_conformance_suite(
    request: pytest.FixtureRequest, saver_urls: UrlFactory
) -> None:
    from langgraph.checkpoint.conformance import checkpointer_test, validate

    kind = request.node.callspec.params["saver_urls"]
    opened_types: set[type] = set()

    @checkpointer_test(name=f"interleave-{kind}")
    async def saver() -> AsyncIterator[BaseCheckpointSaver]:
        # Through open_checkpointer, exactly as a run opens it: same class, same serializer.
        async with open_checkpointer(saver_urls()) as opened:
            opened_types.add(type(opened))
            yield opened

    report = await validate(saver)
    report.print_report()
    failures = {
        name: result.failures for name, result in report.results.items() if result.failures
    }
    assert report.passed_all_base(), json.dumps(failures, indent=1)[:4000]
    if kind == "memory":
        assert opened_types == {InMemorySaver}


# A trajectory stopped by a generator failure, resumed, then read back, all under strict msgpack.
# Warnings go to stderr through logging; the guard at the end proves the mode was on.
STRICT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, logging, sys

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")

    from langgraph.checkpoint.serde import _msgpack
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
    from pydantic import BaseModel

    from interleave_thinker.checkpoints.savers import open_checkpointer
    from interleave_thinker.context import Backends
    from interleave_thinker.errors import GeneratorError
    from interleave_thinker.graph import build_graph
    from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
    from interleave_thinker.runner import aresume, arun
    from interleave_thinker.state import Request, RunOptions
    from interleave_thinker.generators.stand_in import StandInImageGenerator

    URL, RUN_DIR = sys.argv[1], sys.argv[2]
    TEXT = "A kite rises. The wind drops. The kite lands in a tree."


    class FailsOnSecondBatch(StandInImageGenerator):
        async def agenerate(self, jobs):
            if len(self.batch_sizes) == 1:
                raise GeneratorError("planned failure", hint="resume")
            return await super().agenerate(jobs)


    def dicts_inside(value, path="state"):
        # Every place where a record came back as a plain dict instead of its class.
        found = []
        if isinstance(value, dict):
            if "sha256" in value or "steps" in value or "attempts" in value or "text" in value:
                found.append(path)
            for key, item in value.items():
                found += dicts_inside(item, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                found += dicts_inside(item, f"{path}[{index}]")
        elif isinstance(value, BaseModel):
            for key in type(value).model_fields:
                found += dicts_inside(getattr(value, key), f"{path}.{key}")
        return found


    async def main():
        assert _msgpack.STRICT_MSGPACK_ENABLED, "LANGGRAPH_STRICT_MSGPACK did not take effect"
        options = RunOptions(width=48, height=48)
        flaky = Backends(StandInPlannerModel(), StandInCriticModel(), FailsOnSecondBatch())
        try:
            await arun(TEXT, profile="test", backends=flaky, options=options, thread_id="strict",
                       run_dir=RUN_DIR, checkpointer=URL)
        except GeneratorError:
            pass
        else:
            raise AssertionError("the first run should have stopped at the second batch")
        resumed = await aresume("strict", profile="test", run_dir=RUN_DIR, checkpointer=URL)
        again = await aresume("strict", profile="test", run_dir=RUN_DIR, checkpointer=URL)
        assert again.document == resumed.document
        report = {"steps": len(resumed.document.steps), "types": {}, "dicts": [], "checkpoints": 0}
        async with open_checkpointer(URL) as saver:
            graph = build_graph(checkpointer=saver)
            config = {"configurable": {"thread_id": "strict"}}
            values = (await graph.aget_state(config)).values
            # A finished thread keeps its attempts in the document; the checkpoints before
            # compose hold them as StepProgress records.
            progress = ()
            async for snapshot in graph.aget_state_history(config):
                progress = snapshot.values.get("progress") or ()
                if progress:
                    break
            attempt = progress[0].attempts[0]
            report["types"] = {
                "request": type(values["request"]).__name__,
                "settings": type(values["settings"]).__name__,
                "options": type(values["settings"].options).__name__,
                "budget": type(values["settings"].options.budget).__name__,
                "plan": type(values["plan"]).__name__,
                "step": type(values["plan"].steps[0]).__name__,
                "progress": type(progress[0]).__name__,
                "attempt": type(attempt).__name__,
                "image": type(attempt.image).__name__,
                "critique": type(attempt.critique).__name__,
                "document": type(values["document"]).__name__,
                "document_step": type(values["document"].steps[0]).__name__,
            }
            # Every checkpoint and its pending writes, not only the last one.
            async for snapshot in graph.aget_state_history(config):
                report["checkpoints"] += 1
                report["dicts"] += dicts_inside(snapshot.values)
            async for item in saver.alist(config):
                report["dicts"] += dicts_inside(item.checkpoint["channel_values"], "channels")
                report["dicts"] += dicts_inside([w[2] for w in item.pending_writes or ()], "writes")
        print(json.dumps(report))
        sys.stdout.flush()
        # Guard: with no allow-list, strict mode must block our records and say so.
        print("=== guard ===", file=sys.stderr, flush=True)
        serde = JsonPlusSerializer()
        blocked = serde.loads_typed(serde.dumps_typed(Request(text="guard")))
        print(json.dumps({"guard_type": type(blocked).__name__}))


    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_records_survive_strict_msgpack_on_sqlite_across_a_resume(tmp_path: Path) -> None:
    env = {**os.environ, "LANGGRAPH_STRICT_MSGPACK": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("INTERLEAVE_RUN_DIR", None)
    url = f"sqlite:///{tmp_path}/strict.sqlite"
    result = subprocess.run(
        [sys.executable, "-c", STRICT_SCRIPT, url, str(tmp_path / "runs")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    before_guard, _, after_guard = result.stderr.partition("=== guard ===")
    assert after_guard, "the script did not reach its guard:\n" + result.stderr[-4000:]
    for marker in ("unregistered", "Blocked deserialization"):
        assert marker not in before_guard, before_guard[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    report, guard = lines
    assert report["steps"] == 3
    assert report["types"] == {
        "request": "Request",
        "settings": "RunSettings",
        "options": "RunOptions",
        "budget": "Budget",
        "plan": "Plan",
        "step": "Step",
        "progress": "StepProgress",
        "attempt": "Attempt",
        "image": "ImageRef",
        "critique": "Critique",
        "document": "Document",
        "document_step": "DocumentStep",
    }
    assert report["dicts"] == []
    assert report["checkpoints"] >= 6
    # The guard: strict mode was on, so an unlisted record is blocked (and logged as such).
    assert guard["guard_type"] != "Request"
    assert "Blocked deserialization" in after_guard
