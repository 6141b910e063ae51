"""The diffusers pipeline families the generator knows: classes, edit modes, call arguments, defaults."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from interleave_thinker.errors import ConfigurationError

__all__ = [
    "FAMILIES",
    "EditMode",
    "PipelineFamily",
    "SourceSharing",
    "detect_family",
    "family_for_class",
    "read_model_index",
]

MODEL_INDEX = "model_index.json"


class EditMode(StrEnum):
    """How a family draws an edit (a job with source images)."""

    # The text-to-image pipeline itself takes ``image=``.
    SAME_PIPELINE = "same_pipeline"
    # An image-to-image class built with ``from_pipe``: same weights, no second load.
    FROM_PIPE = "from_pipe"
    # Edits need other weights (another model folder); this one cannot edit.
    SEPARATE_MODEL = "separate_model"
    # The model only edits: it has no text-to-image mode.
    EDIT_ONLY = "edit_only"


class SourceSharing(StrEnum):
    """How a pipeline's ``image=`` relates to a batch of prompts."""

    # One source per prompt (``image=[src_1, ..., src_n]``): edits of different images batch together.
    PER_PROMPT = "per_prompt"
    # ``image=`` is one set of references conditioning every prompt of the call, so only edits of the
    # very same images can share a call.
    SHARED = "shared"


@dataclass(frozen=True)
class PipelineFamily:
    """What the generator needs to know to drive one diffusers pipeline class."""

    name: str
    pipeline_class: str
    edit_mode: EditMode
    # The class that draws edits: the same class, a from_pipe class, or the separate model's class.
    edit_class: str | None
    default_steps: int
    default_guidance: float
    # The call argument guidance goes to: "guidance_scale" or "true_cfg_scale" (Qwen-Image).
    guidance_arg: str = "guidance_scale"
    # Arguments the generator passes, per mode (checked against the installed pipelines in the tests).
    text_args: frozenset[str] = frozenset()
    edit_args: frozenset[str] = frozenset()
    # Fixed extra arguments per mode; none of them varies between runs, so the class pins the pixels.
    text_extra: Mapping[str, Any] = field(default_factory=dict)
    edit_extra: Mapping[str, Any] = field(default_factory=dict)
    source_sharing: SourceSharing = SourceSharing.PER_PROMPT
    # How many source images one edit takes; None: any number (multi-reference).
    max_sources: int | None = 1
    # A negative prompt is required for true CFG in Qwen-Image; its reference code passes " ".
    negative_prompt: str | None = None
    # Kontext scales the requested size to max_area (1024x1024 by default): pass the job's own area.
    pass_max_area: bool = False
    # img2img classes draw at the size of their source, so sources are resized to the job's size first.
    resize_sources: bool = False
    # Why a mode is missing or how to get it, for error messages.
    note: str = ""
    # Other (steps, guidance) defaults keyed by the value of model_index.json's ``variant_key``
    # (None when the key is absent), e.g. FLUX.2-klein base vs step-distilled.
    variant_key: str | None = None
    variant_defaults: Mapping[Any, tuple[int, float]] = field(default_factory=dict)

    @property
    def can_generate(self) -> bool:
        return self.edit_mode is not EditMode.EDIT_ONLY

    @property
    def can_edit(self) -> bool:
        return self.edit_mode is not EditMode.SEPARATE_MODEL

    def defaults(self, config: Mapping[str, Any] | None = None) -> tuple[int, float]:
        """Default (steps, guidance) for a model whose model_index.json holds ``config`` (None: unknown)."""
        if config is not None and self.variant_key is not None:
            variant = config.get(self.variant_key)
            if variant in self.variant_defaults:
                return self.variant_defaults[variant]
        return self.default_steps, self.default_guidance

    def call_kwargs(
        self,
        *,
        prompts: Sequence[str],
        generators: Sequence[Any],
        width: int,
        height: int,
        steps: int,
        guidance: float,
        sources: Sequence[Sequence[Any]] = (),
    ) -> dict[str, Any]:
        """The keyword arguments of one pipeline call drawing ``prompts`` (edits when ``sources`` is given).

        ``sources`` holds one tuple of images per prompt; for a SHARED family they must all be the same.
        """
        edit = bool(sources)
        accepted = self.edit_args if edit else self.text_args
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "generator": list(generators),
            "num_inference_steps": steps,
            self.guidance_arg: guidance,
            "num_images_per_prompt": 1,
            "output_type": "pil",
        }
        if "width" in accepted:
            kwargs["width"], kwargs["height"] = width, height
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts)
        if self.pass_max_area:
            kwargs["max_area"] = width * height
        if edit:
            if self.source_sharing is SourceSharing.SHARED:
                first = list(sources[0])
                kwargs["image"] = first if self.max_sources != 1 else first[0]
            else:
                kwargs["image"] = [images[0] for images in sources]
        kwargs.update(self.edit_extra if edit else self.text_extra)
        unknown = set(kwargs) - accepted - {"output_type"}
        if unknown:  # a family table bug, not a user error
            raise AssertionError(f"{self.pipeline_class} call got undeclared arguments {sorted(unknown)}")
        return kwargs


_COMMON = frozenset({"prompt", "generator", "num_inference_steps", "num_images_per_prompt"})
_GUIDED = _COMMON | {"guidance_scale"}
_SIZED = _GUIDED | {"width", "height"}
_IMG2IMG_STRENGTH = 0.6  # enough change to follow an edit prompt, enough kept to stay the same picture

_FAMILY_LIST = (
    PipelineFamily(
        name="FLUX.2-klein",
        pipeline_class="Flux2KleinPipeline",
        edit_mode=EditMode.SAME_PIPELINE,
        edit_class="Flux2KleinPipeline",
        # The step-distilled release (FLUX.2-klein-4B/9B): 4 steps, guidance 1.0 as in the paper.
        default_steps=4,
        default_guidance=1.0,
        text_args=_SIZED,
        edit_args=_SIZED | {"image"},
        source_sharing=SourceSharing.SHARED,
        max_sources=None,
        # The -base releases are not distilled (their model_index.json lacks is_distilled: true).
        variant_key="is_distilled",
        variant_defaults={None: (50, 4.0), False: (50, 4.0)},
    ),
    PipelineFamily(
        name="FLUX.2-dev",
        pipeline_class="Flux2Pipeline",
        edit_mode=EditMode.SAME_PIPELINE,
        edit_class="Flux2Pipeline",
        default_steps=50,
        default_guidance=4.0,
        text_args=_SIZED,
        edit_args=_SIZED | {"image"},
        source_sharing=SourceSharing.SHARED,
        max_sources=None,
    ),
    PipelineFamily(
        name="FLUX.1",
        pipeline_class="FluxPipeline",
        edit_mode=EditMode.FROM_PIPE,
        edit_class="FluxImg2ImgPipeline",
        default_steps=28,
        default_guidance=3.5,
        text_args=_SIZED,
        edit_args=_SIZED | {"image", "strength"},
        edit_extra={"strength": _IMG2IMG_STRENGTH},
        resize_sources=True,
        note="FLUX.1 edits are image-to-image redraws (FluxImg2ImgPipeline); "
        "FLUX.1 Kontext or FLUX.2-klein follow edit instructions far better",
    ),
    PipelineFamily(
        name="FLUX.1-Kontext",
        pipeline_class="FluxKontextPipeline",
        edit_mode=EditMode.SAME_PIPELINE,
        edit_class="FluxKontextPipeline",
        default_steps=28,
        default_guidance=2.5,
        text_args=_SIZED | {"max_area"},
        edit_args=_SIZED | {"max_area", "image"},
        pass_max_area=True,
    ),
    PipelineFamily(
        name="Qwen-Image",
        pipeline_class="QwenImagePipeline",
        edit_mode=EditMode.SEPARATE_MODEL,
        edit_class="QwenImageEditPipeline",
        default_steps=50,
        default_guidance=4.0,
        guidance_arg="true_cfg_scale",
        text_args=_COMMON | {"true_cfg_scale", "negative_prompt", "width", "height"},
        negative_prompt=" ",
        note="Qwen-Image draws from text only; edits need the separate Qwen-Image-Edit weights "
        "(QwenImageEditPipeline, e.g. Qwen/Qwen-Image-Edit) loaded as their own generator",
    ),
    PipelineFamily(
        name="Qwen-Image-Edit",
        pipeline_class="QwenImageEditPipeline",
        edit_mode=EditMode.EDIT_ONLY,
        edit_class="QwenImageEditPipeline",
        default_steps=50,
        default_guidance=4.0,
        guidance_arg="true_cfg_scale",
        edit_args=_COMMON | {"true_cfg_scale", "negative_prompt", "width", "height", "image"},
        negative_prompt=" ",
        # The prompt is encoded together with the image, one image for the whole call.
        source_sharing=SourceSharing.SHARED,
        note="Qwen-Image-Edit only edits; draw first images with Qwen-Image (QwenImagePipeline)",
    ),
    PipelineFamily(
        name="Qwen-Image-Edit-Plus",
        pipeline_class="QwenImageEditPlusPipeline",
        edit_mode=EditMode.EDIT_ONLY,
        edit_class="QwenImageEditPlusPipeline",
        default_steps=40,
        default_guidance=4.0,
        guidance_arg="true_cfg_scale",
        edit_args=_COMMON | {"true_cfg_scale", "negative_prompt", "width", "height", "image"},
        negative_prompt=" ",
        source_sharing=SourceSharing.SHARED,
        max_sources=None,
        note="Qwen-Image-Edit-Plus only edits; draw first images with Qwen-Image (QwenImagePipeline)",
    ),
    PipelineFamily(
        name="SDXL",
        pipeline_class="StableDiffusionXLPipeline",
        edit_mode=EditMode.FROM_PIPE,
        edit_class="StableDiffusionXLImg2ImgPipeline",
        default_steps=50,
        default_guidance=5.0,
        text_args=_SIZED,
        # SDXL img2img has no width/height: it draws at the size of its source.
        edit_args=_GUIDED | {"image", "strength"},
        edit_extra={"strength": _IMG2IMG_STRENGTH},
        resize_sources=True,
        note="SDXL edits are image-to-image redraws (StableDiffusionXLImg2ImgPipeline)",
    ),
    PipelineFamily(
        name="SD3",
        pipeline_class="StableDiffusion3Pipeline",
        edit_mode=EditMode.FROM_PIPE,
        edit_class="StableDiffusion3Img2ImgPipeline",
        default_steps=28,
        default_guidance=7.0,
        text_args=_SIZED,
        edit_args=_SIZED | {"image", "strength"},
        edit_extra={"strength": _IMG2IMG_STRENGTH},
        resize_sources=True,
        note="SD3 edits are image-to-image redraws (StableDiffusion3Img2ImgPipeline)",
    ),
)

# Keyed by the pipeline class name that model_index.json's ``_class_name`` holds.
FAMILIES: dict[str, PipelineFamily] = {family.pipeline_class: family for family in _FAMILY_LIST}


def family_for_class(class_name: str) -> PipelineFamily:
    """The family of a diffusers pipeline class name; ConfigurationError for classes not supported."""
    family = FAMILIES.get(class_name)
    if family is None:
        supported = ", ".join(f"{name} ({f.name})" for name, f in FAMILIES.items())
        raise ConfigurationError(
            f"pipeline class {class_name!r} is not supported by the diffusers generator",
            hint=f"supported: {supported}; pass pipeline=<one of them> if the model is compatible",
        )
    return family


def read_model_index(folder: str | Path) -> dict[str, Any]:
    """The model_index.json of a local diffusers folder; ConfigurationError if there is none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigurationError(
            f"model folder {str(folder)!r} does not exist",
            hint="pass a local diffusers folder (one holding model_index.json) or a Hugging Face model id",
        )
    index = path / MODEL_INDEX
    if not index.is_file():
        raise ConfigurationError(
            f"{str(folder)!r} is not a diffusers folder: it has no {MODEL_INDEX}",
            hint="write one with pipeline.save_pretrained(folder) or download a diffusers-format "
            "model with `hf download <model id> --local-dir <folder>`",
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(
            f"cannot read {index}: {exc}", hint="the folder's model_index.json is damaged"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{index} is not a JSON object", hint="its model_index.json is damaged")
    return data


def detect_family(
    model: str | Path | None = None,
    *,
    pipeline: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> PipelineFamily:
    """The family of an explicit class name, else of ``config``'s or the local folder's ``_class_name``."""
    if pipeline:
        return family_for_class(pipeline)
    if config is None:
        if model is None:
            raise ConfigurationError("no model folder and no pipeline class given", hint="pass one of them")
        config = read_model_index(model)
    class_name = config.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise ConfigurationError(
            f"{MODEL_INDEX} of {model!s} names no pipeline class (_class_name)",
            hint="name the pipeline class explicitly (generator_pipeline setting, pipeline=)",
        )
    return family_for_class(class_name)
