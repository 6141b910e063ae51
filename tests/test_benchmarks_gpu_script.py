"""The GPU checks (scripts/gpu_device_checks.sh) and their benchmarks: the configs have the sizes of
FLUX.2-klein-4B and Qwen3-VL-8B, the modules refuse a CPU without --tiny-cpu, and the whole
script runs locally on tiny shapes (the vLLM part too where INTERLEAVE_VLLM_PYTHON is set)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks import gpu_flux2_klein as script  # noqa: E402
from benchmarks import gpu_qwen3_vl as qwen  # noqa: E402
from benchmarks import gpu_vllm_engine as engine  # noqa: E402
from benchmarks import gpu_vllm_report as report  # noqa: E402

SCRIPT = REPO_ROOT / "scripts" / "gpu_device_checks.sh"


def _without_gpu() -> dict[str, str]:
    """The environment of a child that sees no CUDA device, even on a machine with one."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_configs_fit_together() -> None:
    transformer, text, vae = script.TRANSFORMER_CONFIG, script.TEXT_ENCODER_CONFIG, script.VAE_CONFIG
    # The pipeline feeds the transformer three text-encoder hidden states side by side.
    assert transformer["joint_attention_dim"] == 3 * text["hidden_size"]
    # The VAE's latents are patchified 2x2 before the transformer sees them.
    assert transformer["in_channels"] == vae["latent_channels"] * math.prod(vae["patch_size"])
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert transformer["num_attention_heads"] * transformer["attention_head_dim"] == 3072
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (5, 20)


def test_parameter_counts_are_those_of_the_4b_model_without_allocating() -> None:
    module = script.build_transformer("meta")
    assert all(parameter.is_meta for parameter in module.parameters())
    counts = script.parameter_counts()
    assert 3.5e9 < counts["transformer"] < 4.5e9
    assert 3.5e9 < counts["text_encoder"] < 4.5e9
    assert 50e6 < counts["vae"] < 120e6
    for name, expected in script.EXPECTED_PARAMETERS.items():
        assert counts[name] == pytest.approx(expected, rel=0.01), name


@pytest.mark.slow
def test_exits_with_a_clear_message_without_cuda() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_flux2_klein"],
        cwd=REPO_ROOT, env=_without_gpu(), capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert completed.returncode == script.EXIT_NO_CUDA, completed.stderr
    assert "no CUDA device" in completed.stderr
    assert "Nothing was built or measured" in completed.stderr
    assert completed.stdout == ""


@pytest.mark.slow
def test_tiny_cpu_smoke_run_prints_the_markdown_section(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_flux2_klein", "--tiny-cpu", "--size", "64",
         "--steps", "1", "--batches", "1,2", "--repeats", "1", "--json", str(numbers)],
        cwd=REPO_ROOT, env=_without_gpu(), capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    assert text.startswith("## f. FLUX.2-klein-4B on CPU (smoke test)")
    assert "| 1 | " in text and "| 2 | " in text
    assert "| second run (warm) |" in text
    assert "Graph only (the same trajectory" in text and "ms per image" in text
    assert json.loads(numbers.read_text())["graph_only"]["images"] == 4


def test_qwen3_vl_8b_shapes_have_the_published_parameter_count() -> None:
    text, vision = qwen.QWEN3_VL_8B_TEXT, qwen.QWEN3_VL_8B_VISION
    assert text["num_attention_heads"] * text["head_dim"] == 4096 == text["hidden_size"]
    assert sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"] // 2
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert qwen.parameter_count() == qwen.EXPECTED_PARAMETERS_8B
    assert 8.7e9 < qwen.EXPECTED_PARAMETERS_8B < 8.8e9


def test_model_folder_has_qwens_token_layout(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    folder = qwen.write_model_folder(tmp_path / "tiny", tiny=True)
    assert not list(folder.glob("*.safetensors"))  # no weights: vLLM builds dummy ones
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    assert len(tokenizer) == config.text_config.vocab_size == 151936
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id == 151655
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config.text_config.eos_token_id
    # Any id a random model emits decodes.
    assert isinstance(tokenizer.decode([5, 151000, 151935]), str)


def _results(*, vllm: bool) -> report.Results:
    setup = {"size": 1024, "max_tokens": 256, "planner_tokens": 512, "steps": 2, "max_batch": 8,
             "window_s": 12.0, "hf_window_s": 10.0}
    if not vllm:
        setup["vllm_skipped"] = f"{engine.VLLM_NOT_IMPORTABLE} (no vllm package on the path)"
    results = report.Results(device="NVIDIA H200", setup=setup)
    for concurrency in (1, 8, 32):
        results.windows.append(report.Window("transformers", concurrency, 2, 10.0, 512, 2700))
        if vllm:
            results.windows.append(report.Window("vllm", concurrency, 24 * concurrency, 12.0,
                                                 24 * concurrency * 256, 2700))
    results.batches.append(report.BatchRun(8, 8, 20.0, 16, 4, 8.0, 8, 16, 0))
    return results


def test_report_gives_the_ratio_and_the_target() -> None:
    text = report.markdown(_results(vllm=True))
    assert "| 8 | vllm | 192 | 12.0 | 16.00 | 4096 | 80.0x |" in text
    assert "Target: vLLM at least 10x transformers at 8 in flight: 80.0x, holds." in text
    assert "| 8 | 8 | 16 | 20.0 | 0.80 | 4 | 8.0 | 60 % | 8 | 16 | 0 |" in text


def test_report_says_when_vllm_was_not_importable() -> None:
    text = report.markdown(_results(vllm=False))
    assert "**skipped: vllm not importable (no vllm package on the path)**" in text
    assert "| vllm |" not in text
    assert "not measured, skipped: vllm not importable" in text
    assert "The planner and critic are scripted" in text


@pytest.mark.slow
def test_vllm_engine_module_exits_with_a_clear_message_without_cuda() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_vllm_engine"],
        cwd=REPO_ROOT, env=_without_gpu(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == engine.EXIT_NO_CUDA, completed.stderr
    assert "no CUDA device" in completed.stderr and "Nothing was built or measured" in completed.stderr


@pytest.mark.slow
def test_the_whole_script_runs_locally_on_tiny_shapes(tmp_path: Path) -> None:
    """Parts a, d and e with --tiny-cpu (no wheels, no CUDA tests); e without vllm here."""
    out = tmp_path / "out"
    env = {
        **_without_gpu(), "SKIP_WHEELS": "1", "SKIP_CUDA_TESTS": "1", "PYTHON": sys.executable,
        "OUT": str(out), "GPU_BENCH_ARGS": "--tiny-cpu --size 64 --steps 1 --batches 1,2 --repeats 1",
        "GPU_VLLM_ARGS": "--tiny-cpu --concurrency 1,2 --window-s 1 --hf-window-s 1",
    }
    completed = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=600, check=False)
    summary = (out / "summary.txt").read_text()
    assert completed.returncode == 0, summary + completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "d. benchmarks.gpu_flux2_klein (124 = timed out): rc=0" in summary
    assert "e. benchmarks.gpu_vllm_engine (124 = timed out): rc=0" in summary
    # At most 8 files: what a lent machine sends back.
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "setup.txt", "cuda_tests.txt", "gpu.md", "gpu.json", "vllm.md", "vllm.json", "bench_log.txt",
        "summary.txt"])
    assert "Graph only (the same trajectory" in (out / "gpu.md").read_text()
    section = (out / "vllm.md").read_text()
    assert section.startswith(f"## {report.SECTION_TITLE} on CPU (smoke test)")
    assert "| 2 | transformers | " in section
    assert "| 2 | 2 | 4 | " in section  # the batch run: 2 prompts, 4 images
    numbers = json.loads((out / "vllm.json").read_text())
    assert numbers["batches"][0]["failed"] == 0 and numbers["batches"][0]["error"] is None
    if engine.vllm_import_error() is not None:
        assert "e. vLLM engine: skipped: vllm not importable" in summary
        assert "| 2 | vllm |" not in section


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_module_in_the_vllm_environment(tmp_path: Path) -> None:
    """The engine part for real on the CPU: the vLLM environment, tiny shapes, one engine start."""
    from vllm_server import SKIP_REASON, _server_env, vllm_python

    python = vllm_python()
    if python is None:
        pytest.skip(SKIP_REASON)
    # That environment has no diffusers: a folder holding only a link to the main one's.
    import diffusers

    site = tmp_path / "site"
    site.mkdir()
    (site / "diffusers").symlink_to(Path(diffusers.__file__).parent)
    env = {**_server_env(tmp_path), "PYTHONPATH": str(site), "CUDA_VISIBLE_DEVICES": ""}
    section = tmp_path / "vllm.md"
    completed = subprocess.run(
        [python, "-m", "benchmarks.gpu_vllm_engine", "--tiny-cpu", "--markdown", str(section),
         "--json", str(tmp_path / "vllm.json")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    text = section.read_text()
    assert "| 4 | vllm | " in text and "| 4 | transformers | " in text
    assert "skipped" not in text
