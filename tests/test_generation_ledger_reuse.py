"""A generator node that re-runs (as after a crash before its checkpoint) reuses recorded images."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from langgraph.runtime import Runtime

from conftest import RecordingGenerator
from interleave_thinker.context import Backends, Context
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.nodes import generator as generator_node
from interleave_thinker.nodes.generator import generate_images
from interleave_thinker.state import Plan, Request, RunOptions, RunSettings, Step, StepProgress
from interleave_thinker.storage.image_store import ImageStore
from interleave_thinker.storage.ledger import GenerationLedger


def _state(options: RunOptions) -> dict:
    plan = Plan(steps=tuple(Step(number=n, prompt=f"animal {n}", sources=()) for n in (1, 2, 3)))
    return {
        "request": Request(text="three animals"),
        "settings": RunSettings(profile="test", planner="p", critic="c", generator="g",
                                options=options),
        "plan": plan,
        "progress": tuple(StepProgress(number=n, next_prompt=f"animal {n}") for n in (1, 2, 3)),
        "generator_calls": 0,
    }


def _context(tmp_path: Path) -> Context:
    store = ImageStore(tmp_path / "images")
    return Context(
        backends=Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                          generator=RecordingGenerator()),
        image_store=store,
        ledger=GenerationLedger(tmp_path / "generations", store),
    )


async def test_rerun_of_a_finished_batch_calls_the_backend_zero_times(tmp_path: Path) -> None:
    context = _context(tmp_path)
    generator = context.backends.generator
    assert isinstance(generator, RecordingGenerator)
    state = _state(RunOptions(width=32, height=32))
    first = await generate_images(state, Runtime(context=context))
    again = await generate_images(state, Runtime(context=context))
    assert generator.batch_sizes == [3]
    images = [item.attempts[0].image for item in first["progress"]]
    assert [item.attempts[0].image for item in again["progress"]] == images
    assert all(item.attempts[0].reused for item in again["progress"])
    assert again["generator_calls"] == first["generator_calls"] == 3


async def test_a_lost_image_is_drawn_again_rather_than_trusted(tmp_path: Path) -> None:
    context = _context(tmp_path)
    store, generator = context.image_store, context.backends.generator
    assert isinstance(generator, RecordingGenerator)
    state = _state(RunOptions(width=32, height=32))
    first = await generate_images(state, Runtime(context=context))
    store.path_for(first["progress"][1].attempts[0].image).unlink()
    again = await generate_images(state, Runtime(context=context))
    assert generator.batch_sizes == [3, 1]
    assert [item.attempts[0].reused for item in again["progress"]] == [True, False, True]
    assert store.contains(again["progress"][1].attempts[0].image)


async def test_a_cancel_after_the_backend_answered_still_records_its_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C between the backend's answer and the ledger record: the resume reuses the images."""
    context = _context(tmp_path)
    generator = context.backends.generator
    assert isinstance(generator, RecordingGenerator)
    state = _state(RunOptions(width=32, height=32))
    checking = asyncio.Event()
    real_check = generator_node._checked_outputs

    async def slow_check(*args: object) -> object:
        checking.set()
        await asyncio.sleep(0.2)  # the cancel lands here, after the draw, before any store
        return await real_check(*args)

    monkeypatch.setattr(generator_node, "_checked_outputs", slow_check)
    node = asyncio.create_task(generate_images(state, Runtime(context=context)))
    await checking.wait()
    node.cancel()
    with pytest.raises(asyncio.CancelledError):
        await node
    monkeypatch.setattr(generator_node, "_checked_outputs", real_check)
    again = await generate_images(state, Runtime(context=context))
    assert generator.batch_sizes == [3]  # nothing drawn twice
    assert all(item.attempts[0].reused for item in again["progress"])
