"""Build (once) and locate the tiny models behind ``--profile demo`` and ``interleave demo``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from interleave_thinker.settings import ModelSettings

DEMO_DIR_ENV = "INTERLEAVE_DEMO_DIR"
# Bump when the builders change, so stale folders from an older release are not reused.
DEMO_MODELS_VERSION = "v1"

DEMO_REQUEST = (
    "A paper boat floats on a quiet pond. Rain starts to fall on it. A small frog climbs aboard."
)

# The tiny planner and critic cannot think: they replay these replies, in the exact format the
# released InterleaveThinker checkpoints print, so the real parser and graph handle them.
DEMO_PLANNER_REPLY = (
    "<think>The demo planner is a tiny scripted model; it always prints this plan.</think>\n"
    "<answer>{'execution_plan': ["
    "{'step_number': 1, 'step_name': 'The boat', 'instruction': 'A paper boat floats on a pond.', "
    "'prompt': 'a folded paper boat floating on a calm pond, soft morning light', "
    "'auxiliary_text': None}, "
    "{'step_number': 2, 'step_name': 'Rain', 'instruction': 'Rain falls on the boat.', "
    "'prompt': 'add rain drops falling on the water and the boat', 'auxiliary_text': None}, "
    "{'step_number': 3, 'step_name': 'The frog', 'instruction': 'A frog climbs aboard.', "
    "'prompt': 'a small green frog climbs onto the paper boat', 'auxiliary_text': None}"
    "]}</answer>"
)
DEMO_CRITIC_REPLY = (
    "<think>The demo critic is a tiny scripted model; it always accepts.</think>\n"
    "<answer>{'previous_step_success': True, 'refine_prompt': None}</answer>"
)


def demo_dir() -> Path:
    """Where the tiny models live: ``$INTERLEAVE_DEMO_DIR`` or the user's cache folder."""
    base = os.environ.get(DEMO_DIR_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "interleave-thinker" / "demo-models"
    return Path(base) / DEMO_MODELS_VERSION


def _build_once(folder: Path, build: Callable[[Path], object]) -> Path:
    done = folder / ".complete"
    if done.exists():
        return folder
    # Build beside the target and rename, so an interrupted build is never mistaken for a model.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    (partial / ".complete").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def ensure_demo_models() -> dict[str, Path]:
    """The folders of the tiny planner, critic and generator, built on first use (seconds)."""
    from interleave_thinker.demo.tiny_diffusers import build_tiny_flux2_klein
    from interleave_thinker.demo.tiny_vlm import build_scripted_vlm

    root = demo_dir()
    return {
        "planner": _build_once(
            root / "planner", lambda path: build_scripted_vlm(path, DEMO_PLANNER_REPLY)
        ),
        "critic": _build_once(
            root / "critic", lambda path: build_scripted_vlm(path, DEMO_CRITIC_REPLY)
        ),
        "generator": _build_once(root / "flux2-klein", build_tiny_flux2_klein),
    }


def demo_model_settings(settings: ModelSettings) -> ModelSettings:
    """The user's settings with the tiny demo models swapped in: on the CPU in float32, unless
    a device was named (``--device cuda``), which is then honoured with the chosen dtype."""
    folders = ensure_demo_models()
    # 'auto' would pick a GPU when there is one; the demo's promise is that it runs anywhere.
    on_cpu = settings.device in ("auto", "cpu")
    return settings.model_copy(
        update={
            "planner": str(folders["planner"]),
            "critic": str(folders["critic"]),
            "generator": str(folders["generator"]),
            "generator_pipeline": None,
            "device": "cpu" if on_cpu else settings.device,
            "dtype": "float32" if on_cpu else settings.dtype,
            "cpu_offload": False,
            "steps": 2,
            "guidance": 1.0,
            "max_new_tokens": 512,
            "temperature": 0.0,
        }
    )
