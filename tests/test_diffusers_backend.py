"""The diffusers generator on tiny pipelines built from configs: detection, batching, determinism, errors."""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from interleave_thinker.demo.tiny_diffusers import TINY_BUILDERS  # noqa: E402
from interleave_thinker.errors import ConfigurationError, GeneratorError  # noqa: E402
from interleave_thinker.generators.base import GenerationJob, ImageGenerator  # noqa: E402
from interleave_thinker.generators.diffusers_backend import DiffusersGenerator  # noqa: E402
from interleave_thinker.generators.pipelines import (  # noqa: E402
    FAMILIES,
    EditMode,
    detect_family,
    family_for_class,
)

KLEIN = "Flux2KleinPipeline"
SIZE = 64


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny pipeline folder, built once per session (about 0.5 MB each)."""
    root = tmp_path_factory.mktemp("tiny-diffusers")
    return {name: build(root / name) for name, build in TINY_BUILDERS.items()}


@pytest.fixture(scope="session")
def klein(tiny_models: dict[str, Path]) -> DiffusersGenerator:
    return DiffusersGenerator(model=tiny_models[KLEIN], steps=2)


def job(prompt: str = "a red fox in snow", seed: int = 1, *, sources: tuple[Image.Image, ...] = (),
        width: int = SIZE, height: int = SIZE) -> GenerationJob:
    return GenerationJob(prompt=prompt, seed=seed, width=width, height=height, source_images=sources)


def pixels(image: Image.Image | bytes) -> Any:
    assert isinstance(image, Image.Image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image | bytes, b: Image.Image | bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def pattern(seed: int) -> Image.Image:
    """A source image full of structure, so edits of two sources have something to differ by."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def spy_calls(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> list[dict[str, Any]]:
    """Record the keyword arguments of every call of ``pipe``'s class (calls still run)."""
    calls: list[dict[str, Any]] = []
    original: Callable[..., Any] = type(pipe).__call__

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording)
    return calls


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as if set before start: huggingface_hub also reads it once, at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_model_index(folder: Path, class_name: str, **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, **extra}))
    return folder


# -- families and detection ---------------------------------------------------------------------


@pytest.mark.parametrize("class_name", sorted(TINY_BUILDERS))
def test_family_is_detected_from_model_index(tiny_models: dict[str, Path], class_name: str) -> None:
    assert detect_family(tiny_models[class_name]).pipeline_class == class_name


@pytest.mark.parametrize(
    "class_name", ["Flux2Pipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"]
)
def test_families_without_a_tiny_model_are_detected_too(tmp_path: Path, class_name: str) -> None:
    assert detect_family(write_model_index(tmp_path, class_name)).pipeline_class == class_name


def test_explicit_pipeline_overrides_model_index(tiny_models: dict[str, Path]) -> None:
    family = detect_family(tiny_models["FluxPipeline"], pipeline="FluxKontextPipeline")
    assert family.pipeline_class == "FluxKontextPipeline"


async def test_explicit_pipeline_draws_with_that_class(tiny_models: dict[str, Path]) -> None:
    # FLUX.1 and Kontext share their components, so FLUX.1 weights load into the Kontext class.
    generator = DiffusersGenerator(model=tiny_models["FluxPipeline"], pipeline="FluxKontextPipeline", steps=2)
    assert "FluxKontextPipeline" in generator.identity
    [image] = await generator.agenerate([job(sources=(pattern(0),))])
    assert type(generator.load()).__name__ == "FluxKontextPipeline"
    assert image.size == (SIZE, SIZE)


def test_unknown_class_names_itself_and_the_supported_ones(tmp_path: Path) -> None:
    folder = write_model_index(tmp_path, "StableDiffusionPipeline")
    with pytest.raises(ConfigurationError) as caught:
        detect_family(folder)
    assert "StableDiffusionPipeline" in caught.value.message
    assert "Flux2KleinPipeline" in caught.value.hint
    with pytest.raises(ConfigurationError, match="NoSuchPipeline"):
        DiffusersGenerator(model=folder, pipeline="NoSuchPipeline")


@pytest.mark.parametrize("class_name", sorted(FAMILIES))
def test_declared_call_arguments_exist_in_the_installed_diffusers(class_name: str) -> None:
    family = family_for_class(class_name)
    if family.can_generate:
        text_params = inspect.signature(getattr(diffusers, family.pipeline_class).__call__).parameters
        assert family.text_args <= set(text_params)
    if family.can_edit:
        edit_params = inspect.signature(getattr(diffusers, family.edit_class or "").__call__).parameters
        assert family.edit_args <= set(edit_params)


def test_klein_defaults_follow_the_distilled_flag() -> None:
    family = family_for_class(KLEIN)
    assert family.defaults({"is_distilled": True}) == (4, 1.0)  # FLUX.2-klein-4B, as in the paper
    assert family.defaults({}) == (50, 4.0)  # FLUX.2-klein-base-4B has no is_distilled
    assert family.defaults(None) == (4, 1.0)  # unknown: the paper's model


def test_identity_names_everything_that_changes_pixels(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[KLEIN]
    default = DiffusersGenerator(model=folder)
    assert "steps=4" in default.identity and "guidance=1" in default.identity
    assert all(word in default.identity for word in (str(folder), KLEIN, "dtype=float32"))
    identities = {
        default.identity,
        DiffusersGenerator(model=folder, steps=2).identity,
        DiffusersGenerator(model=folder, guidance=2.0).identity,
        DiffusersGenerator(model=folder, dtype="bfloat16").identity,
    }
    assert len(identities) == 4
    assert isinstance(default, ImageGenerator)


# -- FLUX.2-klein through agenerate ---------------------------------------------------------------


async def test_klein_text_to_image_sizes_and_seeds(klein: DiffusersGenerator) -> None:
    first, again, other = await klein.agenerate([job(seed=1), job(seed=1), job(seed=2)])
    assert first.size == (SIZE, SIZE)
    assert max_diff(first, again) == 0
    assert max_diff(first, other) > 20
    # Off-grid and non-square sizes come back exactly as asked.
    [odd] = await klein.agenerate([job(width=72, height=40)])
    assert odd.size == (72, 40)


async def test_klein_edit_follows_its_source(
    klein: DiffusersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_calls(monkeypatch, klein.load())
    source_a, source_b = pattern(1), pattern(2)
    edit_a, edit_a_again, edit_b = await klein.agenerate(
        [job("make it blue", sources=(source_a,)), job("make it blue", sources=(source_a,)),
         job("make it blue", sources=(source_b,))]
    )
    [plain] = await klein.agenerate([job("make it blue")])
    assert edit_a.size == (SIZE, SIZE)
    assert max_diff(edit_a, edit_a_again) == 0
    assert max_diff(edit_a, edit_b) > 0
    assert max_diff(edit_a, plain) > 0
    # Klein's image= conditions a whole call: edits of different sources never share one.
    assert [len(call["prompt"]) for call in calls] == [2, 1, 1]
    assert calls[0]["image"][0].tobytes() == source_a.tobytes()
    assert "image" not in calls[2]


async def test_klein_takes_several_reference_images(klein: DiffusersGenerator) -> None:
    [single] = await klein.agenerate([job(sources=(pattern(1),))])
    [double] = await klein.agenerate([job(sources=(pattern(1), pattern(3)))])
    assert double.size == (SIZE, SIZE)
    assert max_diff(single, double) > 0


async def test_independent_jobs_share_one_call_and_match_jobs_alone(
    klein: DiffusersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_calls(monkeypatch, klein.load())
    jobs = [job("a lighthouse", 11), job("a teapot", 12), job("a forest at dusk", 13)]
    batched = await klein.agenerate(jobs)
    assert len(calls) == 1 and calls[0]["prompt"] == [j.prompt for j in jobs]
    assert len(calls[0]["generator"]) == 3
    for one, image in zip(jobs, batched, strict=True):
        [alone] = await klein.agenerate([one])
        # Same noise (one generator per image); CPU kernels may round a batch differently by 1/255.
        assert max_diff(image, alone) <= 1


async def test_batches_split_by_kind_size_and_max_batch(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = DiffusersGenerator(model=tiny_models[KLEIN], steps=2, max_batch=2)
    calls = spy_calls(monkeypatch, generator.load())
    source = pattern(4)
    jobs = [job(seed=1), job(seed=2), job(seed=3), job(seed=4, width=96), job(seed=5, sources=(source,))]
    images = await generator.agenerate(jobs)
    assert [len(call["prompt"]) for call in calls] == [2, 1, 1, 1]
    assert [image.size for image in images] == [(64, 64)] * 3 + [(96, 64), (64, 64)]


async def test_concurrent_batches_never_overlap_in_the_pipeline(
    klein: DiffusersGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = klein.load()
    original = type(pipe).__call__
    active, most = 0, 0

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            return original(self, *args, **kwargs)
        finally:
            active -= 1

    monkeypatch.setattr(type(pipe), "__call__", counting)
    results = await asyncio.gather(*(klein.agenerate([job(seed=seed)]) for seed in range(3)))
    assert most == 1 and len(results) == 3


@pytest.mark.usefixtures("offline")
async def test_reload_from_saved_folder_offline_is_bit_identical(
    klein: DiffusersGenerator, tmp_path: Path
) -> None:
    jobs = [job(seed=7), job("make it green", 8, sources=(pattern(5),))]
    before = await klein.agenerate(jobs)
    klein.load().save_pretrained(tmp_path / "saved")
    reloaded = DiffusersGenerator(model=tmp_path / "saved", steps=2)
    after = await reloaded.agenerate(jobs)
    assert all(max_diff(a, b) == 0 for a, b in zip(before, after, strict=True))


# -- the other families ---------------------------------------------------------------------------

OTHERS = ["FluxPipeline", "FluxKontextPipeline", "QwenImagePipeline", "StableDiffusionXLPipeline",
          "StableDiffusion3Pipeline"]


@pytest.mark.parametrize("class_name", OTHERS)
async def test_other_families_draw_and_edit(tiny_models: dict[str, Path], class_name: str) -> None:
    # img2img at strength 0.6 starts 40% into the schedule; with 2 steps that rounds to step 0,
    # pure noise, and the source would be ignored.
    generator = DiffusersGenerator(model=tiny_models[class_name], steps=3)
    first, other = await generator.agenerate([job(seed=1), job(seed=2)])
    assert first.size == other.size == (SIZE, SIZE)
    assert max_diff(first, other) > 0
    [again] = await generator.agenerate([job(seed=1)])
    assert max_diff(first, again) <= 1  # drawn alone now, in a batch of two before
    edits = [job("make it blue", sources=(pattern(1),)), job("make it blue", sources=(pattern(2),))]
    if not generator.family.can_edit:
        with pytest.raises(GeneratorError) as caught:
            await generator.agenerate(edits)
        assert "Qwen-Image-Edit" in caught.value.hint
        return
    edit_a, edit_b = await generator.agenerate(edits)
    assert edit_a.size == (SIZE, SIZE)
    assert max_diff(edit_a, edit_b) > 0


async def test_img2img_edit_shares_weights_in_the_pipeline_dtype(tiny_models: dict[str, Path]) -> None:
    generator = DiffusersGenerator(model=tiny_models["StableDiffusionXLPipeline"], steps=2)
    assert generator.family.edit_mode is EditMode.FROM_PIPE
    await generator.agenerate([job(sources=(pattern(1),))])
    base, edit = generator.load(), generator.load(edit=True)
    assert type(edit).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert edit.unet is base.unet and base.unet.dtype == torch.float32


# -- errors ---------------------------------------------------------------------------------------


def test_missing_folder_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        DiffusersGenerator(model=tmp_path / "no-such-model")


def test_folder_without_model_index_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a diffusers folder") as caught:
        DiffusersGenerator(model=tmp_path)
    assert "save_pretrained" in caught.value.hint


@pytest.mark.usefixtures("offline")
def test_uncached_hub_id_offline_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigurationError) as caught:
        DiffusersGenerator(model="example-org/not-downloaded")
    assert "HF_HUB_OFFLINE" in caught.value.hint


async def test_broken_folder_fails_to_load_with_a_hint(tmp_path: Path) -> None:
    generator = DiffusersGenerator(model=write_model_index(tmp_path, KLEIN, is_distilled=True))
    with pytest.raises(ConfigurationError, match="cannot load") as caught:
        await generator.agenerate([job()])
    assert "save_pretrained" in caught.value.hint


async def test_jobs_a_model_cannot_draw_are_refused_before_loading(tmp_path: Path) -> None:
    edit_only = DiffusersGenerator(model=write_model_index(tmp_path / "edit", "QwenImageEditPipeline"))
    with pytest.raises(GeneratorError, match="from text alone") as caught:
        await edit_only.agenerate([job()])
    assert "QwenImagePipeline" in caught.value.hint
    kontext = DiffusersGenerator(model=write_model_index(tmp_path / "kontext", "FluxKontextPipeline"))
    with pytest.raises(GeneratorError, match="1 source"):
        await kontext.agenerate([job(sources=(pattern(1), pattern(2)))])
    assert not edit_only.loaded and not kontext.loaded


async def test_out_of_memory_becomes_a_generator_error_with_a_hint(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = DiffusersGenerator(model=tiny_models[KLEIN], steps=2)

    def out_of_memory(self: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(generator.load()), "__call__", out_of_memory)
    with pytest.raises(GeneratorError, match="out of GPU memory") as caught:
        await generator.agenerate([job()])
    assert "cpu_offload" in caught.value.hint and "max_batch" in caught.value.hint


def test_bad_settings_are_configuration_errors(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[KLEIN]
    for settings in ({"max_batch": 0}, {"steps": 0}, {"dtype": "int8"}, {"device": "warp-drive"}):
        with pytest.raises(ConfigurationError):
            DiffusersGenerator(model=folder, **settings)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="cpu_offload"):
            DiffusersGenerator(model=folder, cpu_offload=True)


def test_modules_import_without_torch() -> None:
    code = (
        "import sys; import interleave_thinker.generators.diffusers_backend, "
        "interleave_thinker.generators.pipelines, "
        "interleave_thinker.demo.tiny_diffusers; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
