"""The device and dtype rules the in-process backends (transformers, diffusers) share."""

from __future__ import annotations

import subprocess
import sys

import pytest

from interleave_thinker.devices import resolve_device, resolve_dtype, torch_dtype
from interleave_thinker.errors import ConfigurationError

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_a_torch_device_name_is_kept_as_given(device: str) -> None:
    # Named devices are checked for their spelling only: no GPU is needed to name one.
    assert resolve_device(device) == device


@pytest.mark.parametrize("device", ["auto", "AUTO", " auto "])
def test_auto_is_cuda_when_torch_sees_a_gpu_else_cpu(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(device) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(device) == "cpu"


@pytest.mark.parametrize("device", ["warp-drive", "", "cuda:x", "gpu"])
def test_an_unknown_device_says_what_to_use(device: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unknown device {device!r}") as caught:
        resolve_device(device)
    assert "auto, cpu, cuda or cuda:N" in caught.value.hint


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        ("auto", "cuda", "bfloat16"),
        ("auto", "cuda:1", "bfloat16"),
        ("auto", "cpu", "float32"),
        ("auto", "mps", "float32"),
        ("Auto", "cpu", "float32"),
        ("bfloat16", "cpu", "bfloat16"),
        ("bf16", "cuda", "bfloat16"),
        ("float16", "cuda", "float16"),
        ("FP16", "cpu", "float16"),
        ("float32", "cuda", "float32"),
        ("fp32", "cpu", "float32"),
    ],
)
def test_dtypes_resolve_to_the_torch_name(dtype: str, device: str, expected: str) -> None:
    assert resolve_dtype(dtype, device) == expected
    assert torch_dtype(expected) == getattr(torch, expected)


@pytest.mark.parametrize("dtype", ["int8", "", "float64", "half precision"])
def test_an_unknown_dtype_says_what_to_use(dtype: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unknown dtype {dtype!r}") as caught:
        resolve_dtype(dtype, "cpu")
    assert "bfloat16, float16 or float32" in caught.value.hint


def test_the_module_imports_without_torch() -> None:
    code = "import sys, interleave_thinker.devices; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
