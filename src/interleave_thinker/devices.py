"""Where the in-process backends (transformers, diffusers) put their weights: device and dtype.

One set of rules for both, so the same ``--device``/``--dtype`` settings mean the same thing to
the planner, the critic and the generator. torch is imported only when a device is resolved.
"""

from __future__ import annotations

from typing import Any

from interleave_thinker.errors import ConfigurationError

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "torch_dtype"]

# Accepted spellings (any case) -> the torch dtype's name.
DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
    "fp32": "float32",
}
DEVICE_HINT = "use auto, cpu, cuda or cuda:N (any torch device name)"
DTYPE_HINT = "use auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32"


def resolve_device(device: str) -> str:
    """``auto`` (any case) becomes ``cuda`` when torch sees a GPU, else ``cpu``; another name is
    returned as given once torch accepts it as a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...).

    Raises ``ConfigurationError`` for a name torch does not know, or when torch is not installed.
    """
    torch = _import_torch()
    if device.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"unknown device {device!r}", hint=DEVICE_HINT) from exc
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype's torch name for weights on ``device`` (a resolved device, not ``auto``).

    ``auto`` is bfloat16 on CUDA (what the released models are trained in, at half the memory
    of float32) and float32 elsewhere (CPUs are slow or inexact in half precision); otherwise
    bfloat16, float16 or float32, also as bf16, fp16 or fp32, in any case.
    Raises ``ConfigurationError`` for any other name.
    """
    key = dtype.strip().lower() if isinstance(dtype, str) else None
    if key == "auto":
        return "bfloat16" if device.split(":")[0] == "cuda" else "float32"
    name = DTYPES.get(key) if key else None
    if name is None:
        raise ConfigurationError(f"unknown dtype {dtype!r}", hint=DTYPE_HINT)
    return name


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` for a name ``resolve_dtype`` returned."""
    return getattr(_import_torch(), name)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConfigurationError(
            "the in-process models need torch",
            hint="install torch, then the backend: pip install 'interleave-thinker[diffusers,transformers]'",
        ) from exc
    return torch
