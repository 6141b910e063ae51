"""The GPU benchmark script: it imports, its configs have FLUX.2-klein-4B's size, and it refuses a CPU."""

from __future__ import annotations

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
    assert numbers.is_file()
