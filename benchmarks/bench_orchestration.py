"""Benchmark a: a trajectory through the graph (SQLite, sync durability) against a hand-written loop."""

from __future__ import annotations

import asyncio
import cProfile
import functools
import pstats
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.common import (
    Figure,
    FixedCostGenerator,
    chain_backends,
    chain_request,
    median_or_nan,
)
from interleave_thinker.checkpoints.savers import (
    open_checkpointer,
)
from interleave_thinker.context import Backends
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.graph import build_graph
from interleave_thinker.models.messages import ImageInliningChatModel, image_block
from interleave_thinker.nodes.asking import ask_until_parsed
from interleave_thinker.nodes.scheduling import derive_seed, select_attempt
from interleave_thinker.prompts.parsing import parse_plan, parse_verdict
from interleave_thinker.prompts.templates import critic_messages, planner_messages
from interleave_thinker.runner import arun, make_settings, trajectory_input
from interleave_thinker.state import (
    Attempt,
    Budget,
    Document,
    DocumentStep,
    ImageRef,
    Request,
    RunOptions,
    StepStatus,
    parse_source,
)
from interleave_thinker.storage.image_store import ImageStore, blank_canvas, encode_png
from interleave_thinker.storage.ledger import GenerationLedger, generation_key
from interleave_thinker.workspace import Workspace

SECTION = "a. Orchestration overhead: graph vs hand-written loop"
REJECTIONS = 2  # each step: rejected twice, accepted on attempt 3
GENERATOR_S = 0.05
# Seconds per call of the full-size FLUX.2-klein-4B, batch 1, on an H100 (GPU_REPORT.md).
REAL_GENERATOR_S = 0.668
IMAGE_SIZE = 64
THREAD = "bench"
TARGET_RATIO = 1.03
TARGET_MS_PER_CALL = 5.0
def run_options() -> RunOptions:
    return RunOptions(
        width=IMAGE_SIZE, height=IMAGE_SIZE, budget=Budget(max_attempts=REJECTIONS + 1)
    )


def _calls(steps: int) -> int:
    return steps * (REJECTIONS + 1)


def _new_generator(generator_s: float) -> FixedCostGenerator:
    return FixedCostGenerator("fixed-cost", generator_s, 0.0)


async def graph_once(root: Path, steps: int, generator_s: float) -> tuple[float, Document]:
    """``arun`` on a fresh run directory (SQLite checkpointer, sync durability); wall seconds."""
    generator = _new_generator(generator_s)
    backends = chain_backends(generator, rejections=REJECTIONS)
    started = time.perf_counter()
    result = await arun(
        chain_request(steps), backends=backends, options=run_options(), thread_id=THREAD,
        run_dir=root,
    )
    seconds = time.perf_counter() - started
    _check(generator, steps, result.document)
    return seconds, result.document


def _check(generator: FixedCostGenerator, steps: int, document: Document) -> None:
    if generator.calls != _calls(steps) or document.generator_calls != _calls(steps):
        raise AssertionError(
            f"expected {_calls(steps)} generator calls, got {generator.calls} "
            f"(document: {document.generator_calls})"
        )


def _load_job(store: ImageStore, job: GenerationJob, sources: list[ImageRef]) -> GenerationJob:
    images = tuple(store.open(ref) for ref in sources)
    return GenerationJob(**{**job.__dict__, "source_images": images})


def _store_and_record(
    store: ImageStore, ledger: GenerationLedger, key: str, output: Image.Image | bytes
) -> ImageRef:
    data = output if isinstance(output, bytes) else encode_png(output)
    ref = store.put(data, what="generated image")
    ledger.record(key, ref)
    return ref


async def hand_written_loop(
    text: str, backends: Backends, options: RunOptions, workspace: Workspace, thread_id: str
) -> Document:
    """The same model, generator and image-store calls as the graph, in plain Python: no
    LangGraph, no checkpoints, no state records between steps, no progress events."""
    context = workspace.context(backends)
    store, ledger, generator = context.image_store, context.ledger, backends.generator
    budget = options.budget
    request = Request(text=text)
    planner = ImageInliningChatModel(inner=backends.planner, store=store)
    critic = ImageInliningChatModel(inner=backends.critic, store=store)
    plan, _ = await ask_until_parsed(
        planner,
        planner_messages(request, [], max_steps=options.max_steps),
        lambda reply: parse_plan(reply, input_images=0, max_steps=options.max_steps),
        what="plan",
        max_reasks=options.max_reasks,
        where="loop, planning",
        config={"run_name": "planner", "tags": ["planner"], "metadata": {"thread_id": thread_id}},
    )
    final: dict[int, ImageRef] = {}
    document_steps = []
    calls = 0
    for step in plan.steps:
        sources = [final[number] for _, number in map(parse_source, step.sources)]
        prompt = step.prompt or ""
        attempts: list[Attempt] = []
        status: StepStatus = "forced"
        for number in range(1, budget.max_attempts + 1):
            seed = derive_seed(options.seed, step.number, number if options.reseed_retries else 1)
            key = generation_key(
                generator=generator.identity, thread=thread_id, prompt=prompt,
                sources=[ref.sha256 for ref in sources], seed=seed, width=options.width,
                height=options.height,
            )
            started = time.time()
            image = await asyncio.to_thread(ledger.lookup, key)
            if image is None:
                job = GenerationJob(
                    prompt=prompt, seed=seed, width=options.width, height=options.height,
                    thread_id=thread_id, step=step.number, attempt=number,
                )
                job = await asyncio.to_thread(_load_job, store, job, sources)
                outputs = await generator.agenerate([job])
                image = await asyncio.to_thread(_store_and_record, store, ledger, key, outputs[0])
            calls += 1
            generated = time.time() - started
            previous = sources[0] if sources else await asyncio.to_thread(
                blank_canvas, store, image.width, image.height
            )
            judged = time.monotonic()
            critique, _ = await ask_until_parsed(
                critic,
                critic_messages(
                    step_name=step.name, instruction=step.instruction,
                    planned_prompt=step.prompt or "", used_prompt=prompt,
                    previous_image=image_block(previous), candidate_image=image_block(image),
                ),
                parse_verdict,
                what="verdict",
                max_reasks=options.max_reasks,
                where=f"loop, step {step.number}, attempt {number}",
                config={
                    "run_name": "critic", "tags": ["critic"],
                    "metadata": {"thread_id": thread_id, "step": step.number, "attempt": number},
                },
            )
            attempts.append(
                Attempt(
                    step=step.number, number=number, prompt=prompt, seed=seed, image=image,
                    critique=critique, started_at=started, generation_seconds=generated,
                    critique_seconds=time.monotonic() - judged,
                )
            )
            if critique.success:
                status = "accepted"
                break
            prompt = critique.refine_prompt or prompt
        chosen = len(attempts) - 1 if status == "accepted" else select_attempt(
            attempts, budget.selection
        )
        final[step.number] = attempts[chosen].image
        document_steps.append(
            DocumentStep(
                number=step.number, name=step.name, text=step.display_text,
                instruction=step.instruction, status=status, image=final[step.number],
                attempts=tuple(attempts), chosen=chosen,
            )
        )
    document = Document(
        request=request, steps=tuple(document_steps), profile="custom", generator_calls=calls
    )
    await asyncio.to_thread(workspace.write_document_page, thread_id, document)
    return document


async def loop_once(root: Path, steps: int, generator_s: float) -> tuple[float, Document]:
    generator = _new_generator(generator_s)
    backends = chain_backends(generator, rejections=REJECTIONS)
    started = time.perf_counter()
    workspace = Workspace.open(root)
    document = await hand_written_loop(
        chain_request(steps), backends, run_options(), workspace, THREAD
    )
    seconds = time.perf_counter() - started
    _check(generator, steps, document)
    return seconds, document


class _SaverClock:
    """Wall time spent inside a saver's aput / aput_writes / aget_tuple calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def wrap(self, saver: Any) -> None:
        for name in ("aput", "aput_writes", "aget_tuple"):
            setattr(saver, name, self._timed(name, getattr(saver, name)))

    def _timed(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.counts[name] = self.counts.get(name, 0) + 1

        return timed


async def graph_variant_once(
    root: Path, steps: int, generator_s: float, *, checkpointer: str | None, durability: str,
    clock: _SaverClock | None = None,
) -> float:
    """The compiled graph driven directly (as ``arun`` does) with another checkpointer or
    durability; ``checkpointer=None`` compiles it without one."""
    generator = _new_generator(generator_s)
    backends = chain_backends(generator, rejections=REJECTIONS)
    started = time.perf_counter()
    workspace = Workspace.open(root, checkpointer or "memory://unused")
    settings = make_settings("custom", backends, run_options())
    graph_input = trajectory_input(Request(text=chain_request(steps)), settings)
    context = workspace.context(backends)
    config = {"configurable": {"thread_id": THREAD}}

    async def drive(graph: Any) -> None:
        if checkpointer is None:
            # No state to read back: the final values come from the stream. (LangGraph 1.2
            # fails when durability is given to a graph without a checkpointer.)
            values: dict[str, Any] = {}
            async for mode, chunk in graph.astream(
                graph_input, config, context=context, stream_mode=["custom", "values"]
            ):
                if mode == "values":
                    values = chunk
            document = values["document"]
        else:
            async for _ in graph.astream(
                graph_input, config, context=context, durability=durability, stream_mode="custom"
            ):
                pass
            document = (await graph.aget_state(config)).values["document"]
        await asyncio.to_thread(workspace.write_document_page, THREAD, document)

    if checkpointer is None:
        await drive(build_graph())
    else:
        async with open_checkpointer(checkpointer) as saver:
            if clock is not None:
                clock.wrap(saver)
            await drive(build_graph(checkpointer=saver))
    seconds = time.perf_counter() - started
    if generator.calls != _calls(steps):
        raise AssertionError(f"expected {_calls(steps)} generator calls, got {generator.calls}")
    return seconds


def _package(filename: str, function: str) -> str:
    if filename == "~":
        return "idle (event loop waiting)" if "poll" in function or "select" in function else "builtins"
    path = filename.replace("\\", "/")
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/src/interleave_thinker/" in path:
        return "interleave_thinker"
    if "/benchmarks/" in path:
        return "benchmarks (loop code)"
    if "/python3" in path and "/lib/" in path:
        return "stdlib:" + path.rsplit("/lib/", 1)[1].split("/", 2)[1].removesuffix(".py")
    return "other"


def _profile(coroutine: Callable[[], Awaitable[Any]]) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(coroutine())  # type: ignore[arg-type]
    finally:
        profiler.disable()
    return pstats.Stats(profiler)


def _by_package(stats: pstats.Stats) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        package = _package(filename, function)
        totals[package] = totals.get(package, 0.0) + tottime
    return totals


def _top_functions(stats: pstats.Stats, calls: int, limit: int) -> list[str]:
    rows = []
    for (filename, line, function), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if _package(filename, function).startswith("idle"):
            continue
        rows.append((tottime, cumtime, ncalls, f"{Path(filename).name}:{line} {function}"))
    rows.sort(reverse=True)
    return [
        f"{1000 * tottime / calls:6.2f} ms self, {1000 * cumtime / calls:7.2f} ms cum, "
        f"{ncalls / calls:6.1f} calls  {where}"
        for tottime, cumtime, ncalls, where in rows[:limit]
    ]


def _profile_notes(root: Path, steps: int, generator_s: float) -> tuple[float, str]:
    """cProfile (main thread only) of one graph run and one loop run: the extra CPU per generator
    call (waiting excluded) and a breakdown by package and function."""
    calls = _calls(steps)
    graph_stats = _profile(lambda: graph_once(root / f"p-graph-{uuid.uuid4().hex}", steps, generator_s))
    loop_stats = _profile(lambda: loop_once(root / f"p-loop-{uuid.uuid4().hex}", steps, generator_s))
    graph_packages, loop_packages = _by_package(graph_stats), _by_package(loop_stats)
    names = sorted(
        graph_packages.keys() | loop_packages.keys(),
        key=lambda name: graph_packages.get(name, 0.0) - loop_packages.get(name, 0.0),
        reverse=True,
    )
    lines = [
        "cProfile of one graph run and one loop run (main thread only: work handed to "
        "`asyncio.to_thread` and aiosqlite's thread shows up as waiting), time per generator "
        "call, by package. The profiler's own cost inflates Python-heavy code, so read the "
        "columns against each other rather than as wall time:",
        "",
        "```",
        f"{'package':40} {'graph ms':>9} {'loop ms':>9} {'diff ms':>9}",
    ]
    for name in names:
        graph_ms = 1000 * graph_packages.get(name, 0.0) / calls
        loop_ms = 1000 * loop_packages.get(name, 0.0) / calls
        if max(graph_ms, loop_ms) >= 0.05:
            lines.append(f"{name:40} {graph_ms:9.2f} {loop_ms:9.2f} {graph_ms - loop_ms:9.2f}")
    lines += ["```", "", "Top functions of the graph run by self time (per generator call):", "", "```"]
    lines += _top_functions(graph_stats, calls, 15)
    lines += ["```"]
    busy = [name for name in names if not name.startswith("idle")]
    extra = sum(graph_packages.get(n, 0.0) - loop_packages.get(n, 0.0) for n in busy)
    return 1000 * extra / calls, "\n".join(lines)


VARIANT_NOTES = {
    "sqlite": "The project's saver (WAL, `synchronous=NORMAL`) driven directly (as `arun` "
    "does): the reference for the rows below.",
    "sqlite-async": "LangGraph saves each checkpoint while the next step runs.",
    "sqlite-exit": "One checkpoint when the run ends: no crash safety at all.",
    "memory": "InMemorySaver: the same serialization, no disk.",
    "none": "Compiled without a checkpointer: LangGraph's own scheduling, the state records and "
    "the nodes' bookkeeping, nothing saved.",
}


def _variants(
    fresh: Callable[[str], Path], steps: int, generator_s: float, rounds: int
) -> list[Figure]:
    """Each round runs the loop once, then every variant; a sample is variant - that loop run.
    Time spent awaiting the saver is clocked too."""
    variants = [
        ("SQLite, durability=sync", "sqlite", "sqlite", "sync"),
        ("SQLite, durability=async", "sqlite-async", "sqlite", "async"),
        ("SQLite, durability=exit", "sqlite-exit", "sqlite", "exit"),
        ("memory://, durability=sync", "memory", "memory", "sync"),
        ("no checkpointer", "none", "none", "sync"),
    ]
    calls = _calls(steps)
    samples: dict[str, list[float]] = {key: [] for _, key, _, _ in variants}
    clocks: dict[str, list[_SaverClock]] = {key: [] for _, key, _, _ in variants}
    for _ in range(rounds):
        loop_seconds, _ = asyncio.run(loop_once(fresh("vl"), steps, generator_s))
        for _, key, kind, durability in variants:
            directory = fresh("v")
            url = {
                "sqlite": f"sqlite:///{directory / 'checkpoints.sqlite'}",
                "memory": f"memory://{uuid.uuid4().hex}",
            }.get(kind)
            clock = _SaverClock()
            seconds = asyncio.run(graph_variant_once(
                directory, steps, generator_s, checkpointer=url, durability=durability, clock=clock
            ))
            samples[key].append(1000 * (seconds - loop_seconds) / calls)
            clocks[key].append(clock)
    figures = []
    for label, key, kind, _ in variants:
        notes = VARIANT_NOTES[key]
        if kind != "none":
            per_call = {
                name: median_or_nan(1000 * c.seconds.get(name, 0.0) / calls for c in clocks[key])
                for name in ("aput", "aput_writes")
            }
            counts = {name: clocks[key][0].counts.get(name, 0) for name in per_call}
            notes += (
                " Awaited inside the saver, per generator call (median of the rounds): "
                + ", ".join(
                    f"`{name}` {per_call[name]:.2f} ms ({counts[name]} calls per run)"
                    for name in per_call
                )
                + "."
            )
        figures.append(
            Figure(SECTION, f"variant: graph, {label}: overhead per call", "ms", samples[key],
                   notes=notes)
        )
    return figures


def _at_real_cost(fresh: Callable[[str], Path], steps: int, repeats: int) -> Figure:
    """The same comparison with each generator call as long as a real one on a GPU."""
    graph_s: list[float] = []
    loop_s: list[float] = []
    for index in range(repeats):
        order = (graph_once, loop_once) if index % 2 == 0 else (loop_once, graph_once)
        for runner in order:
            seconds, _ = asyncio.run(runner(fresh("real"), steps, REAL_GENERATOR_S))
            (graph_s if runner is graph_once else loop_s).append(seconds)
    return Figure(
        SECTION, f"graph wall time, {_calls(steps)}-call trajectory, {REAL_GENERATOR_S:g} s per call",
        "s", graph_s, loop_s,
        target=f"ratio <= {TARGET_RATIO}",
        check=lambda f: f.ratio is not None and f.ratio <= TARGET_RATIO,
        notes=f"As above, with each generator call sleeping {REAL_GENERATOR_S:g} s: the median "
        "seconds per call of a full-size FLUX.2-klein-4B at 1024x1024, batch 1, 4 steps, on an "
        "H100 (benchmarks/GPU_REPORT.md), the fastest real generator measured here.",
    )


def run(repeats: int, quick: bool) -> list[Figure]:
    """Graph and loop alternate (after one warm-up of each), each in a fresh run directory."""
    steps = 3 if quick else 10
    generator_s = 0.01 if quick else GENERATOR_S
    calls = _calls(steps)
    graph_s: list[float] = []
    loop_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        root = Path(tmp)

        def fresh(label: str) -> Path:
            return root / f"{label}-{uuid.uuid4().hex}"

        _, graph_document = asyncio.run(graph_once(fresh("graph"), steps, generator_s))
        _, loop_document = asyncio.run(loop_once(fresh("loop"), steps, generator_s))
        if graph_document.content_for_comparison() != loop_document.content_for_comparison():
            raise AssertionError("the hand-written loop did not produce the graph's document")
        for index in range(repeats):
            order = (graph_once, loop_once) if index % 2 == 0 else (loop_once, graph_once)
            for runner in order:
                seconds, _ = asyncio.run(runner(fresh("r"), steps, generator_s))
                (graph_s if runner is graph_once else loop_s).append(seconds)
        overhead_ms = [1000 * (g - lo) / calls for g, lo in zip(graph_s, loop_s, strict=True)]
        floor = calls * generator_s
        trajectory = (
            f"{steps} chained steps x {REJECTIONS + 1} attempts (critic rejects twice, accepts "
            f"the third) = {calls} generator calls of {1000 * generator_s:g} ms "
            f"({floor:.2f} s of sleep), {IMAGE_SIZE}x{IMAGE_SIZE} images"
        )
        figures = [
            Figure(
                SECTION, f"graph wall time, {calls}-call trajectory", "s", graph_s, loop_s,
                target=f"ratio <= {TARGET_RATIO}",
                check=lambda f: f.ratio is not None and f.ratio <= TARGET_RATIO,
                notes=f"{trajectory}. Graph: `arun` with a fresh SQLite checkpointer (sync "
                "durability), HTML page included. Baseline: a hand-written loop making the "
                "same planner/critic `ainvoke` calls (same messages, same image inlining), the "
                "same generator calls and the same image-store and ledger writes, and writing "
                "the same HTML page; its document equals the graph's. Runs alternate.",
            ),
            Figure(
                SECTION, "graph overhead per generator call", "ms", overhead_ms,
                target=f"<= {TARGET_MS_PER_CALL:g} ms",
                check=lambda f: f.median <= TARGET_MS_PER_CALL,
                notes="(graph - loop) / calls, paired run by run.",
            ),
            Figure(
                SECTION, "loop time above the generator sleep, per call", "ms",
                [1000 * (s - floor) / calls for s in loop_s],
                notes="What the work shared by both (models, image store, ledger, HTML) costs.",
            ),
        ]
        if quick:
            return figures
        figures.append(_at_real_cost(fresh, steps, repeats))
        figures += _variants(fresh, steps, generator_s, repeats)
        cpu_ms, notes = _profile_notes(root, steps, generator_s)
        figures.append(
            Figure(
                SECTION, "main-thread CPU per call, graph minus loop (cProfile)", "ms", [cpu_ms],
                notes=notes,
            )
        )
    return figures
