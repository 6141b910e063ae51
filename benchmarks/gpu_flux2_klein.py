"""Full-size FLUX.2-klein-4B (random weights) on a CUDA GPU: seconds per image by batch, graph share."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as `python -m benchmarks.gpu_flux2_klein` from the repository root (no download: the
# weights are random, built from the configs below). Every number in the configs comes from a
# published config.json; where from is written beside it.

# transformer/config.json of FLUX.2-klein in diffusers format, as mirrored in
# huggingface.co/YuCollection/FLUX.2-klein-base-4B-Diffusers (its "_name_or_path" is the diffusers
# team's conversion, "/raid/yiyi/klein-4b-diffusers/transformer"). That file is the -base release;
# the step-distilled FLUX.2-klein-4B's own transformer/config.json was not in the searched index.
# That the distilled 4B has the same shapes is supported by: the NVIDIA model card
# (build.nvidia.com/black-forest-labs/flux_2-klein-4b: "Diffusion Transformer ~4B", text encoder
# "Qwen3ForCausalLM ~4B"; these values give 3.88 B), the OminiX-MLX port of FLUX.2-klein-4B
# ("5 double-stream and 20 single-stream blocks", in_channels 128 after patchify, 7680-dim text
# embeddings) and the 4.07 GB of black-forest-labs/FLUX.2-klein-4b-fp8 (about one byte per
# parameter). Equal to diffusers' Flux2Transformer2DModel defaults (0.42.1): patch_size,
# in_channels, attention_head_dim, timestep_guidance_channels, mlp_ratio, axes_dims_rope,
# rope_theta, eps. The others differ: the defaults describe the 32B FLUX.2-dev (8 + 48 blocks,
# 48 heads, joint_attention_dim 15360, guidance embedding).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,  # 32 VAE latent channels x 2x2 patch
    "out_channels": None,
    "num_layers": 5,  # double-stream blocks
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # inner dim 3072
    "joint_attention_dim": 7680,  # 3 x 2560: Qwen3-4B hidden states 9, 18 and 27 side by side
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,  # klein has no guidance embedding (FLUX.2-dev has one)
}

# text_encoder/config.json of black-forest-labs/FLUX.2-klein-4B is Qwen3-4B's (Qwen3ForCausalLM,
# hidden 2560, head_dim 128: seen in the tovwil/FLUX.2-klein-4B mirror); the remaining values are
# Qwen/Qwen3-4B's config.json (as in MultiRL/qwen3_4b_instruct_sft and other copies): 36 layers,
# 32 query and 8 key-value heads, intermediate 9728, vocabulary 151936, tied embeddings,
# rope_theta 1e6. The 8.05 GB of bfloat16 safetensors on the model page match ~4.02 B parameters.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "attn_implementation": "sdpa",
}

# vae/config.json of FLUX.2-klein-4B (AutoencoderKLFlux2), as in codeShare/Flux-Klein-SDNQ-4bit
# whose "_name_or_path" is the black-forest-labs/FLUX.2-klein-4B snapshot e7b7dc27; identical to
# FLUX.2-dev's VAE and to diffusers' AutoencoderKLFlux2 defaults (0.42.1).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": (2, 2),
    # The published file also has "force_upcast": true, which AutoencoderKLFlux2.__init__ does not
    # take in diffusers 0.42.1 (from_pretrained ignores it); it changes no shape.
}

# scheduler/scheduler_config.json of FLUX.2 as published by the diffusers team
# (diffusers/FLUX.2-dev-bnb-4bit); the klein-4B file itself was not in the searched index. It
# sets the timesteps only: the cost of a step does not depend on it.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

# Parameter counts of the configs above (meta-device init, diffusers 0.42.1, transformers 5.24).
EXPECTED_PARAMETERS = {
    "transformer": 3_875_544_576,
    "text_encoder": 4_022_468_096,
    "vae": 84_046_115,
}

EXIT_NO_CUDA = 2
NO_CUDA_MESSAGE = (
    "gpu_flux2_klein: no CUDA device (torch.cuda.is_available() is False). This benchmark builds "
    "the full-size FLUX.2-klein-4B (about 16 GB of bfloat16 weights) and must run on a CUDA GPU "
    "with at least {min_gib} GiB of memory (an H100 or H200). Nothing was built or measured. "
    "On a CPU, `--tiny-cpu` runs the same measuring code on the tiny demo model (its numbers mean "
    "nothing)."
)
# Weights (~16 GB), one module's float32 copy while it is built (~16 GB) and batch-8 activations.
MIN_GPU_GIB = 40


def fail_without_cuda(min_gib: int = MIN_GPU_GIB) -> None:
    """Exit with a clear message unless a CUDA GPU with ``min_gib`` GiB is present."""
    try:
        import torch
    except ImportError:
        print(NO_CUDA_MESSAGE.format(min_gib=min_gib) + " (torch is not installed.)", file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA) from None
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(min_gib=min_gib), file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < min_gib:
        print(
            f"gpu_flux2_klein: {torch.cuda.get_device_name(0)} has {total:.0f} GiB; the full-size "
            f"model needs at least {min_gib} GiB. Nothing was built or measured.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_CUDA)


# -- building -------------------------------------------------------------------------------------


def build_transformer(device: str = "meta") -> Any:
    """The FLUX.2-klein-4B transformer with random weights, in float32, on ``device``."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device(device):
        return Flux2Transformer2DModel(**TRANSFORMER_CONFIG)


def build_text_encoder(device: str = "meta") -> Any:
    """Qwen3-4B with random weights, in float32, on ``device``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device(device):
        return Qwen3ForCausalLM(Qwen3Config(**TEXT_ENCODER_CONFIG)).eval()


def build_vae(device: str = "meta") -> Any:
    """The FLUX.2 autoencoder with random weights, in float32, on ``device``."""
    import torch
    from diffusers import AutoencoderKLFlux2

    with torch.device(device):
        return AutoencoderKLFlux2(**VAE_CONFIG).eval()


def parameter_counts() -> dict[str, int]:
    """Parameters of each module, counted on the meta device: nothing is allocated."""
    counts = {}
    for name, build in (
        ("transformer", build_transformer),
        ("text_encoder", build_text_encoder),
        ("vae", build_vae),
    ):
        module = build("meta")
        counts[name] = sum(parameter.numel() for parameter in module.parameters())
    return counts


def build_pipeline(device: str, dtype_name: str = "bfloat16") -> Any:
    """The full-size Flux2KleinPipeline on ``device``, each module cast as soon as it is built."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from interleave_thinker.demo.tiny_diffusers import qwen_tokenizer

    dtype = getattr(torch, dtype_name)
    # Built in float32 on the GPU (fast random init), then cast: one float32 module at a time.
    modules = {}
    for name, build in (
        ("transformer", build_transformer),
        ("text_encoder", build_text_encoder),
        ("vae", build_vae),
    ):
        torch.manual_seed(0)
        modules[name] = build(device).to(dtype)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        # A byte-level tokenizer (no download): the pipeline pads every prompt to 512 tokens, so
        # the text encoder does the same work as with Qwen's own tokenizer.
        tokenizer=qwen_tokenizer(),
        is_distilled=True,
        **modules,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_generator(pipeline: Any, folder: Path, *, steps: int, max_batch: int) -> Any:
    """A DiffusersGenerator drawing with ``pipeline``, already in memory.

    The generator loads its pipeline from a folder; saving and reloading 16 GB would cost minutes
    of borrowed GPU time, so the folder gets only model_index.json (for the family and identity)
    and the built pipeline is handed over as the loaded one.
    """
    from interleave_thinker.generators.diffusers_backend import DiffusersGenerator

    pipeline.save_config(folder)
    device = str(pipeline.transformer.device)
    dtype = str(pipeline.transformer.dtype).removeprefix("torch.")
    generator = DiffusersGenerator(
        model=folder, device=device, dtype=dtype, steps=steps, guidance=1.0, max_batch=max_batch
    )
    generator._pipe = pipeline  # deliberate: the private slot `load()` would fill from disk
    return generator


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class BatchTiming:
    batch: int
    seconds: list[float]
    peak_gib: float | None
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_image(self) -> float:
        return self.median / self.batch


@dataclass
class TrajectoryTiming:
    label: str
    wall_s: float
    backend_s: float
    backend_calls: int
    images: int

    @property
    def graph_share(self) -> float:
        return 1.0 - self.backend_s / self.wall_s


@dataclass
class Results:
    device: str
    setup: dict[str, Any]
    batches: list[BatchTiming] = field(default_factory=list)
    trajectories: list[TrajectoryTiming] = field(default_factory=list)
    graph_only: TrajectoryTiming | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_batches(
    generator: Any, sizes: Sequence[int], *, width: int, height: int, repeats: int
) -> list[BatchTiming]:
    """Seconds per backend call (text encoder, denoising, VAE decode, PIL) at each batch size."""
    import torch

    from interleave_thinker.errors import GeneratorError
    from interleave_thinker.generators.base import GenerationJob

    cuda = generator.device.startswith("cuda")
    timings = []
    for batch in sizes:
        jobs = [
            GenerationJob(prompt=f"a lighthouse at dusk, view {i}", seed=i, width=width, height=height)
            for i in range(batch)
        ]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds: list[float] = []
        try:
            asyncio.run(generator.agenerate(jobs))  # warm-up at this shape, not timed
            for _ in range(repeats):
                _sync(generator.device)
                started = time.perf_counter()
                asyncio.run(generator.agenerate(jobs))
                _sync(generator.device)
                seconds.append(time.perf_counter() - started)
        except GeneratorError as exc:
            # Out of memory at a large batch must not lose the smaller batches' numbers.
            print(f"batch {batch}: {exc.message}", file=sys.stderr)
            timings.append(BatchTiming(batch, seconds, None, exc.message))
            break
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        timings.append(BatchTiming(batch, seconds, peak))
        print(f"batch {batch}: {statistics.median(seconds):.3f} s per call", file=sys.stderr)
    return timings


def trajectory_plan() -> list[dict[str, Any]]:
    """Two independent text-to-image steps, then an edit of step 1 and an edit of that edit."""
    from benchmarks.bench_batching import plan_step

    return [
        plan_step(1, "a red kite over a beach", []),
        plan_step(2, "a lighthouse on a cliff", []),
        plan_step(3, "the kite from step 1, now in a storm", [1]),
        plan_step(4, "the same scene at night", [3]),
    ]


def time_trajectory(
    generator: Any, run_dir: Path, label: str, *, width: int, height: int
) -> TrajectoryTiming:
    """Wall time of a whole trajectory through `arun`, and how much of it the backend took."""
    from benchmarks.bench_batching import TimedGenerator, scripted_backends
    from interleave_thinker.runner import arun
    from interleave_thinker.state import RunOptions

    plan = trajectory_plan()
    timed = TimedGenerator(generator)
    started = time.perf_counter()
    result = asyncio.run(
        arun(
            "a kite and a lighthouse",
            backends=scripted_backends(plan, timed),
            options=RunOptions(width=width, height=height),
            run_dir=run_dir,
            thread_id=f"gpu-{label}",
        )
    )
    wall = time.perf_counter() - started
    statuses = [step.status for step in result.document.steps]
    if statuses != ["accepted"] * len(plan):
        raise RuntimeError(f"the scripted trajectory did not accept every step: {statuses}")
    return TrajectoryTiming(label, wall, timed.seconds, timed.calls, len(plan))


class InstantGenerator:
    """Returns pre-drawn noise images at once: the trajectory's wall time is then the graph's own
    work (noise is close to the worst case for PNG, and what random weights draw)."""

    identity = "instant-noise"

    def __init__(self, width: int, height: int, count: int = 8) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        self._images = [
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)
        ]
        self._next = 0

    async def agenerate(self, jobs: Sequence[Any]) -> list[Any]:
        images = []
        for _ in jobs:
            images.append(self._images[self._next % len(self._images)])
            self._next += 1
        return images


def graph_share_note(results: Results) -> str | None:
    """The graph-only run against the warm run's backend time: the projected share of the graph."""
    warm = results.trajectories[-1] if results.trajectories else None
    graph = results.graph_only
    if warm is None or graph is None:
        return None
    share = graph.wall_s / (graph.wall_s + warm.backend_s)
    return (
        f"Graph only (the same trajectory, the generator replaced by one returning pre-drawn "
        f"{results.setup['width']}x{results.setup['height']} noise at once): {graph.wall_s:.2f} s for "
        f"{graph.images} images ({1000 * graph.wall_s / graph.images:.0f} ms per image) on this "
        f"host's CPU; beside the warm run's {warm.backend_s:.2f} s of backend calls that is a graph "
        f"share of {100 * share:.1f} % (target: under 5 %)."
    )


# -- reporting ------------------------------------------------------------------------------------


def markdown(results: Results) -> str:
    """A Markdown section ready to paste into the benchmark report."""
    setup = results.setup
    lines = [
        f"## f. FLUX.2-klein-4B on {results.device}",
        "",
    ]
    if setup.get("smoke"):
        lines += [
            "**Smoke test on the tiny demo model: these numbers say nothing about FLUX.2-klein-4B.**",
            "",
        ]
    lines += [
        f"- Model: {setup['model']}; {setup['dtype']}, {setup['width']}x{setup['height']}, "
        f"{setup['steps']} steps, guidance 1.0; built in {setup['build_s']:.1f} s"
        + (f", {setup['weights_gib']:.1f} GiB of weights on the GPU" if setup.get("weights_gib") else "")
        + ".",
        f"- Software: {setup['software']}.",
        "- Each call goes through `DiffusersGenerator.agenerate` (text encoder, denoising, VAE "
        "decode, PIL conversion), one seeded `torch.Generator` per image; one untimed warm-up "
        f"call per batch size, then the median of {setup['repeats']} timed calls.",
        "",
        "| batch | s per call (median) | spread | s per image | images/s "
        "| speed-up per image vs batch 1 | peak GPU memory |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured = [timing for timing in results.batches if timing.error is None]
    first = measured[0].per_image if measured else None
    for timing in results.batches:
        if timing.error is not None:
            lines.append(f"| {timing.batch} | failed: {timing.error} | | | | | |")
            continue
        peak = f"{timing.peak_gib:.1f} GiB" if timing.peak_gib is not None else "–"
        speedup = f"{first / timing.per_image:.2f}x" if first else "–"
        lines.append(
            f"| {timing.batch} | {timing.median:.3f} | {min(timing.seconds):.3f}..{max(timing.seconds):.3f} "
            f"| {timing.per_image:.3f} | {1 / timing.per_image:.2f} | {speedup} | {peak} |"
        )
    lines += [
        "",
        "Trajectory through `arun` (SQLite checkpoints; scripted planner, critic accepting every "
        "attempt): steps 1 and 2 independent text-to-image (one batched call), step 3 edits step 1, "
        "step 4 edits step 3; the graph's share is the wall time outside the backend calls "
        "(planner and critic calls, PNG encoding, image store, ledger, checkpoints, HTML).",
        "",
        "| run | wall s | backend s | backend calls | graph share |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in results.trajectories:
        lines.append(
            f"| {run.label} | {run.wall_s:.2f} | {run.backend_s:.2f} | {run.backend_calls} "
            f"| {100 * run.graph_share:.1f} % |"
        )
    if (note := graph_share_note(results)) is not None:
        lines += ["", note]
    lines += [
        "",
        "Caveats: random weights (the images are noise; the arithmetic is that of the trained "
        "model, as shapes and dtypes are the same); a byte-level tokenizer stands in for Qwen's "
        "(prompts are padded to 512 tokens either way); nothing was downloaded. Configs and "
        "where each number comes from: `benchmarks/gpu_flux2_klein.py`.",
        "",
    ]
    return "\n".join(lines)


def _software() -> str:
    from importlib import metadata

    import torch

    parts = [f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    for name in ("diffusers", "transformers"):
        parts.append(f"{name} {metadata.version(name)}")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_flux2_klein", description=__doc__)
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--size", type=int, default=1024, help="image width and height")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument(
        "--tiny-cpu", action="store_true",
        help="smoke test: the same code on the tiny demo model on the CPU (numbers meaningless)",
    )
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.batches.split(",") if part.strip()]
    if not args.tiny_cpu:
        fail_without_cuda()  # before anything heavy is imported or built

    import torch

    from benchmarks.bench_batching import quiet_diffusers

    quiet_diffusers()
    with tempfile.TemporaryDirectory(prefix="gpu-flux2-klein-") as tmp:
        started = time.perf_counter()
        if args.tiny_cpu:
            from diffusers import Flux2KleinPipeline

            from interleave_thinker.demo.tiny_diffusers import build_tiny_flux2_klein

            folder = build_tiny_flux2_klein(Path(tmp) / "tiny")
            pipeline = Flux2KleinPipeline.from_pretrained(folder)
            pipeline.set_progress_bar_config(disable=True)
            model, device, dtype = "tiny FLUX.2-klein (demo, random weights)", "cpu", "float32"
            weights_gib = None
        else:
            device, dtype = "cuda", "bfloat16"
            pipeline = build_pipeline(device, dtype)
            torch.cuda.synchronize()
            weights_gib = torch.cuda.memory_allocated() / 2**30
            counts = {
                name: sum(p.numel() for p in getattr(pipeline, name).parameters())
                for name in EXPECTED_PARAMETERS
            }
            model = (
                f"FLUX.2-klein-4B shapes, random weights: transformer {counts['transformer'] / 1e9:.2f} B, "
                f"text encoder (Qwen3-4B) {counts['text_encoder'] / 1e9:.2f} B, "
                f"VAE {counts['vae'] / 1e6:.0f} M parameters"
            )
        build_s = time.perf_counter() - started
        print(f"built in {build_s:.1f} s", file=sys.stderr)
        generator = diffusers_generator(
            pipeline, Path(tmp) / "model", steps=args.steps, max_batch=max(sizes)
        )
        name = "CPU (smoke test)" if args.tiny_cpu else torch.cuda.get_device_name(0)
        results = Results(
            device=name,
            setup={
                "model": model, "dtype": dtype, "width": args.size, "height": args.size,
                "steps": args.steps, "build_s": build_s, "weights_gib": weights_gib,
                "repeats": args.repeats, "software": _software(), "smoke": args.tiny_cpu,
            },
        )
        results.batches = time_batches(
            generator, sizes, width=args.size, height=args.size, repeats=args.repeats
        )
        run_dir = Path(tmp) / "runs"
        for label in ("first run (edit path cold)", "second run (warm)"):
            results.trajectories.append(
                time_trajectory(generator, run_dir, label.split(" ")[0], width=args.size,
                                height=args.size)
            )
            results.trajectories[-1].label = label
        results.graph_only = time_trajectory(
            InstantGenerator(args.size, args.size), run_dir, "graph-only", width=args.size,
            height=args.size,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = asdict(results)
        args.json.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
