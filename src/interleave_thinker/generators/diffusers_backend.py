"""The in-process diffusers image generator: batches of jobs drawn by a local or hub pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from interleave_thinker.devices import resolve_device, resolve_dtype, torch_dtype
from interleave_thinker.errors import ConfigurationError, GeneratorError, one_line
from interleave_thinker.generators.base import GenerationJob
from interleave_thinker.generators.pipelines import (
    EditMode,
    PipelineFamily,
    SourceSharing,
    detect_family,
    read_model_index,
)
from interleave_thinker.settings import quiet_library

__all__ = ["DiffusersGenerator"]

INSTALL_HINT = "install the backend with: pip install 'interleave-thinker[diffusers]'"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


class DiffusersGenerator:
    """An ``ImageGenerator`` over a diffusers pipeline, loaded on first use and kept for the process.

    Jobs that can share a pipeline call (same kind, size and source count, and for pipelines whose
    ``image=`` conditions the whole batch, the same sources) are drawn in one call of at most
    ``max_batch`` images, each from its own ``torch.Generator`` seeded with the job's seed, so the
    noise of an image does not depend on its batch. One pipeline call runs at a time.

    ``model`` is a local diffusers folder or a hub id. The pipeline class (``pipeline``, else
    model_index.json's ``_class_name``) picks the family, its edit mode and default steps and
    guidance; for a hub id without ``pipeline`` the constructor fetches model_index.json (or reads
    it from the cache under ``HF_HUB_OFFLINE``), the weights load on first use.
    """

    def __init__(
        self,
        *,
        model: str | Path,
        pipeline: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        cpu_offload: bool = False,
        steps: int | None = None,
        guidance: float | None = None,
        max_batch: int = 8,
    ) -> None:
        if max_batch < 1:
            raise ConfigurationError(f"max_batch must be at least 1, not {max_batch}")
        if steps is not None and steps < 1:
            raise ConfigurationError(f"steps must be at least 1, not {steps}")
        self.model = os.fspath(model)
        self._local = _is_local(self.model)
        # from_pretrained does not expand "~"; the identity keeps the name as given.
        self._location = str(Path(self.model).expanduser()) if self._local else self.model
        config = self._model_index(pipeline)
        self.family: PipelineFamily = detect_family(self.model, pipeline=pipeline, config=config or {})
        default_steps, default_guidance = self.family.defaults(config)
        self.steps = steps if steps is not None else default_steps
        self.guidance = float(guidance) if guidance is not None else default_guidance
        _import_torch()  # names the extra to install when torch is missing
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if cpu_offload and self.device.split(":")[0] == "cpu":
            raise ConfigurationError(
                "cpu_offload needs a GPU: it moves each model to the GPU only while it runs",
                hint="drop cpu_offload on a machine without a GPU",
            )
        self.cpu_offload = cpu_offload
        self.max_batch = max_batch
        # Everything that changes the pixels; the device type too, as CPU and CUDA draw different noise.
        self.identity = (
            f"diffusers:{self.model} ({self.family.pipeline_class}, steps={self.steps}, "
            f"guidance={self.guidance:g}, dtype={self.dtype}, device={self.device.split(':')[0]})"
        )
        self._pipe: Any = None
        self._edit_pipe: Any = None
        # A thread lock, not an asyncio one: it serves any event loop, and guards loading too.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DiffusersGenerator({self.identity})"

    async def agenerate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image | bytes]:
        jobs = list(jobs)
        images: dict[int, Image.Image] = {}
        for indices in self._plan(jobs):
            drawn = await asyncio.to_thread(self._draw, [jobs[i] for i in indices])
            images.update(zip(indices, drawn, strict=True))
        return [images[index] for index in range(len(jobs))]

    def load(self, *, edit: bool = False) -> Any:
        """Load the pipeline now (the first batch does otherwise) and return it, or the one for edits."""
        with self._lock:
            return self._edit_pipeline() if edit else self._base_pipeline()

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    # -- planning ---------------------------------------------------------------------------------

    def _plan(self, jobs: Sequence[GenerationJob]) -> list[list[int]]:
        """Indices of the jobs, grouped into pipeline calls; refuses jobs the model cannot draw."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            self._check(job)
            groups.setdefault(self._group_key(job), []).append(index)
        return [
            indices[start : start + self.max_batch]
            for indices in groups.values()
            for start in range(0, len(indices), self.max_batch)
        ]

    def _check(self, job: GenerationJob) -> None:
        family = self.family
        if job.width < 1 or job.height < 1:
            raise GeneratorError(f"cannot draw a {job.width}x{job.height} image", hint="use a positive size")
        if job.source_images and not family.can_edit:
            raise GeneratorError(f"{self.model} ({family.name}) cannot edit images", hint=family.note)
        if not job.source_images and not family.can_generate:
            raise GeneratorError(
                f"{self.model} ({family.name}) cannot draw an image from text alone", hint=family.note
            )
        limit = family.max_sources
        if limit is not None and len(job.source_images) > limit:
            raise GeneratorError(
                f"{family.name} edits take {limit} source image(s), this job has {len(job.source_images)}",
                hint="use a multi-reference model (FLUX.2-klein, Qwen-Image-Edit-Plus) or fewer sources",
            )

    def _group_key(self, job: GenerationJob) -> tuple[Any, ...]:
        sources: tuple[Any, ...] = ()
        if self.family.source_sharing is SourceSharing.SHARED:
            # The pipeline conditions every prompt of a call on the same images.
            sources = tuple(_fingerprint(image) for image in job.source_images)
        elif not self.family.resize_sources:
            # Kontext sizes a whole batch by its first source; only same-sized sources go together.
            sources = tuple(image.size for image in job.source_images)
        return (bool(job.source_images), job.width, job.height, len(job.source_images), sources)

    # -- drawing (in a worker thread) ---------------------------------------------------------------

    def _draw(self, jobs: list[GenerationJob]) -> list[Image.Image]:
        torch = _import_torch()
        edit = bool(jobs[0].source_images)
        width, height = jobs[0].width, jobs[0].height
        with self._lock:
            try:
                pipe = self._edit_pipeline() if edit else self._base_pipeline()
                multiple = _size_multiple(pipe)
                draw_w, draw_h = _round_to(width, multiple), _round_to(height, multiple)
                sources = [
                    tuple(self._prepare_source(image, draw_w, draw_h) for image in job.source_images)
                    for job in jobs
                ]
                kwargs = self.family.call_kwargs(
                    prompts=[job.prompt for job in jobs],
                    # One generator per image: its noise is the same in any batch. Offloaded
                    # pipelines still run on the GPU, so the generator lives on self.device.
                    generators=[torch.Generator(self.device).manual_seed(job.seed) for job in jobs],
                    width=draw_w,
                    height=draw_h,
                    steps=self.steps,
                    guidance=self.guidance,
                    sources=sources if edit else (),
                )
                output = pipe(**kwargs)
            except torch.cuda.OutOfMemoryError as exc:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise GeneratorError(
                    f"out of GPU memory drawing {len(jobs)} image(s) of {width}x{height} with {self.model}",
                    hint=f"set cpu_offload=True, lower max_batch (now {self.max_batch}) "
                    "or draw smaller images",
                ) from exc
            except (ValueError, RuntimeError, TypeError) as exc:
                raise GeneratorError(
                    f"{self.family.pipeline_class} failed on {len(jobs)} job(s): {one_line(exc)}",
                    hint="see the chained exception for the pipeline's own message",
                ) from exc
        images = [image.convert("RGB") for image in output.images]
        if len(images) != len(jobs):
            raise GeneratorError(
                f"{self.family.pipeline_class} returned {len(images)} images for {len(jobs)} prompts"
            )
        # Pipelines round sizes to their latent grid; the job's size is part of its contract.
        return [_resized(image, width, height) for image in images]

    def _prepare_source(self, image: Image.Image, width: int, height: int) -> Image.Image:
        image = image.convert("RGB")
        if self.family.resize_sources:
            # img2img pipelines draw at their source's size (SDXL has no width/height at all).
            return _resized(image, width, height)
        return image

    # -- loading --------------------------------------------------------------------------------------

    def _base_pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _edit_pipeline(self) -> Any:
        base = self._base_pipeline()
        if self.family.edit_mode is not EditMode.FROM_PIPE:
            return base
        if self._edit_pipe is None:
            _, diffusers = _import_backend()
            edit_class = _pipeline_class(diffusers, self.family.edit_class or "")
            # from_pipe casts the shared modules to its dtype, float32 unless told otherwise; its cast
            # also warns about float32 modules nobody asked for, so diffusers is quiet meanwhile.
            verbosity = diffusers.utils.logging.get_verbosity()
            diffusers.utils.logging.set_verbosity_error()
            try:
                self._edit_pipe = edit_class.from_pipe(base, **{_dtype_kwarg(diffusers): self._torch_dtype()})
            finally:
                diffusers.utils.logging.set_verbosity(verbosity)
            self._edit_pipe.set_progress_bar_config(disable=True)
        return self._edit_pipe

    def _load(self) -> Any:
        torch, diffusers = _import_backend()
        pipeline_class = _pipeline_class(diffusers, self.family.pipeline_class)
        kwargs: dict[str, Any] = {_dtype_kwarg(diffusers): self._torch_dtype()}
        if _offline():
            kwargs["local_files_only"] = True
        try:
            pipe = pipeline_class.from_pretrained(self._location, **kwargs)
        except ImportError as exc:
            raise ConfigurationError(
                f"loading {self.model} needs a package that is not installed: {one_line(exc)}",
                hint=INSTALL_HINT,
            ) from exc
        except Exception as exc:  # from_pretrained raises many types; all mean "this model cannot load"
            raise ConfigurationError(
                f"cannot load {self.model} as {self.family.pipeline_class}: {one_line(exc)}",
                hint=self._load_hint(),
            ) from exc
        try:
            if self.cpu_offload:
                pipe.enable_model_cpu_offload(device=self.device)
            else:
                pipe.to(self.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise GeneratorError(
                f"{self.model} does not fit in GPU memory in {self.dtype}",
                hint="set cpu_offload=True or use a smaller dtype or model",
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _load_hint(self) -> str:
        if self._local:
            return "the folder must be a complete diffusers pipeline (pipeline.save_pretrained output)"
        if _offline():
            return (
                "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache: "
                "download it first (hf download <id>) or pass a local folder"
            )
        return "check the model id, your network and, for gated models, `hf auth login`"

    def _model_index(self, pipeline: str | None) -> dict[str, Any] | None:
        """The model_index.json, read at construction so the identity knows class and defaults."""
        if self._local:
            return read_model_index(self.model)
        if not _HUB_ID.match(self.model):
            raise ConfigurationError(
                f"model folder {self.model!r} does not exist",
                hint="pass a local diffusers folder (one holding model_index.json) or a Hugging Face "
                "model id such as black-forest-labs/FLUX.2-klein-4B",
            )
        if pipeline:
            return None  # no download just to learn what we were told
        _, diffusers = _import_backend()
        try:
            return dict(diffusers.DiffusionPipeline.load_config(self.model, local_files_only=_offline()))
        except Exception as exc:  # hub errors come in many types
            raise ConfigurationError(
                f"cannot read model_index.json of {self.model!r} (no such local folder, and the hub "
                f"lookup failed): {one_line(exc)}",
                hint=self._load_hint()
                + "; or name the pipeline class (generator_pipeline setting, pipeline=) "
                "to skip the lookup",
            ) from exc

    def _torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConfigurationError("the diffusers generator needs torch", hint=INSTALL_HINT) from exc
    return torch


def _import_backend() -> tuple[Any, Any]:
    torch = _import_torch()
    try:
        import diffusers
    except ImportError as exc:
        raise ConfigurationError(
            f"the diffusers generator needs diffusers and transformers: {one_line(exc)}", hint=INSTALL_HINT
        ) from exc
    quiet_library(diffusers.utils.logging)
    return torch, diffusers


def _pipeline_class(diffusers: Any, name: str) -> Any:
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ConfigurationError(
            f"the installed diffusers {diffusers.__version__} has no {name}",
            hint="upgrade it: pip install -U diffusers",
        )
    return cls


def _dtype_kwarg(diffusers: Any) -> str:
    """``dtype`` where diffusers has it (torch_dtype is deprecated there), else ``torch_dtype``.

    Older releases take no ``dtype`` and would silently load in float32, so feature-detect it.
    """
    markers = getattr(getattr(diffusers, "utils", None), "deprecation_utils", None)
    return "dtype" if hasattr(markers, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _is_local(model: str) -> bool:
    return Path(model).expanduser().exists()


def _offline() -> bool:
    # Read at call time: huggingface_hub reads it once at import, tests and users set it later.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _size_multiple(pipe: Any) -> int:
    """The pixel grid a pipeline draws on: its VAE factor, times the 2x2 latent patches of transformers."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "unet", None) is not None:
        return scale
    return scale * int(getattr(pipe, "patch_size", None) or 2)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _fingerprint(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
