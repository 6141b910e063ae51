"""Which models to load and how: defaults, a TOML settings file, environment variables and CLI flags."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from interleave_thinker.errors import ConfigurationError, one_line

CONFIG_ENV = "INTERLEAVE_CONFIG"
# Set by the CLI: backends then turn off their library's own loading bars when they import it.
QUIET_LIBRARIES_ENV = "INTERLEAVE_QUIET_LIBRARIES"


def quiet_library(logging_module: object) -> None:
    """Disable a library's progress bars (transformers, diffusers) when the CLI asked for it."""
    if os.environ.get(QUIET_LIBRARIES_ENV) == "1":
        logging_module.disable_progress_bar()  # type: ignore[attr-defined]

DEFAULT_PLANNER = "InterleaveThinker/InterleaveThinker-Planner-8B"
# The SFT critic is lenient; the GRPO critic (InterleaveThinker/InterleaveThinker-Critic-8B) is
# stricter and so triggers more redraws: more generator calls for more faithful images.
DEFAULT_CRITIC = "InterleaveThinker/Critic-SFT-8B"
DEFAULT_GENERATOR = "black-forest-labs/FLUX.2-klein-4B"
# Paper mode's defaults: the official scripts' choices (the GRPO critic, the 9B generator).
PAPER_PLANNER = "InterleaveThinker/InterleaveThinker-Planner-8B"
PAPER_CRITIC = "InterleaveThinker/InterleaveThinker-Critic-8B"
PAPER_GENERATOR = "black-forest-labs/FLUX.2-klein-9B"


class ModelSettings(BaseSettings):
    """Model choices. Precedence: CLI flags, then INTERLEAVE_* variables, then the file."""

    model_config = SettingsConfigDict(env_prefix="INTERLEAVE_", extra="forbid")

    planner: str = Field(default=DEFAULT_PLANNER, description="Planner: local folder or hub id.")
    critic: str = Field(default=DEFAULT_CRITIC, description="Critic: local folder or hub id.")
    generator: str = Field(default=DEFAULT_GENERATOR, description="Diffusers folder or hub id.")
    planner_url: str | None = Field(
        default=None, description="OpenAI-compatible server (e.g. vLLM) for the planner: .../v1"
    )
    critic_url: str | None = Field(default=None, description="OpenAI-compatible server for the critic.")
    generator_url: str | None = Field(
        default=None, description="OpenAI-compatible Images API (e.g. vllm-omni) for the generator."
    )
    request_timeout: float = Field(default=300.0, gt=0, description="Seconds per served request.")
    # Operational limits, not part of a thread's settings: a resume may change them.
    generator_timeout: float = Field(
        default=900.0, gt=0, allow_inf_nan=False,
        description="Seconds one batched generator call may take before it counts as hung.",
    )
    model_timeout: float = Field(
        default=600.0, gt=0, allow_inf_nan=False,
        description="Seconds one planner or critic reply may take before it counts as hung.",
    )
    generator_pipeline: str | None = Field(
        default=None, description="Diffusers pipeline class, when model_index.json is not enough."
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, ...")
    dtype: str = Field(default="auto", description="auto (bfloat16 on GPU), bfloat16, float16, float32.")
    cpu_offload: bool = Field(default=False, description="Offload idle diffusers parts to the CPU.")
    steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps.")
    guidance: float | None = Field(default=None, ge=0, description="Guidance scale.")
    # Decoding: None leaves each to the model's own generation_config.json (in process) or the
    # server's defaults (served), as the released checkpoints shipped.
    max_new_tokens: int | None = Field(
        default=None, ge=16, le=65536,
        description="Reply length limit; default 2048, or 4096 with the official prompts.",
    )
    temperature: float | None = Field(default=None, ge=0, le=5, description="0 decodes greedily.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool | None = Field(default=None, description="False decodes greedily.")
    # Prompt pack: interleave, official, official:PATH or auto (the official prompts for the
    # InterleaveThinker checkpoints when fetched).
    prompts: str | None = Field(default=None, description="interleave, official, official:PATH or auto.")
    # The official UEval loop: official prompts, its models, its budget and seeds.
    paper: bool = Field(default=False, description="Reproduce the paper's loop (see README).")
    # In-process planner and critic: transformers' generate (portable, one request at a time per
    # model) or vLLM's engine (batches concurrent requests; the recommended GPU setting).
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers", description="In-process planner/critic engine: transformers or vllm."
    )
    # The vLLM engines' share of the GPU's memory, all of them together: split evenly when the
    # planner and the critic load different weights; the rest is the diffusers pipeline's. On an
    # 80 GB GPU with the default models, 0.6 = 48 GB: 24 GB per 8B engine (17.5 GB of bf16
    # weights, ~2 GB of activations, ~4.5 GB of KV cache, about 30k tokens), leaving 32 GB for
    # FLUX.2-klein-4B (about 16 GB of weights with its text encoder, plus activations).
    vllm_gpu_memory: float = Field(
        default=0.6, gt=0, le=0.95, description="GPU memory share of the vLLM engines together."
    )
    # Where images, the generation ledger and the verdicts live (not a model setting, but read
    # from the same file and INTERLEAVE_IMAGE_STORE): file:// (the run directory) or postgresql://.
    image_store: str | None = Field(
        default=None, description="Image store URL: file:// (default), file:///PATH or postgresql://..."
    )
    vllm_max_model_len: int | None = Field(
        default=16384, ge=256,
        description="Prompt plus reply tokens per vLLM request (None: the checkpoint's, 256k for "
        "Qwen3-VL, which no KV cache share above holds).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_model_settings(config_file: str | os.PathLike[str] | None = None, **flags: Any) -> ModelSettings:
    """Settings from the file (``--config`` or ``$INTERLEAVE_CONFIG``), the environment and ``flags``.

    Flags that are None are left to the other sources.
    """
    path = config_file or os.environ.get(CONFIG_ENV)
    if path and not Path(path).is_file():
        # A FIFO or device could block or never end: only regular files are read.
        what = "is not a regular file" if Path(path).exists() else "does not exist"
        raise ConfigurationError(
            f"settings file {path} {what}", hint="check --config or $INTERLEAVE_CONFIG"
        )

    class _WithFile(ModelSettings):
        model_config = SettingsConfigDict(
            env_prefix="INTERLEAVE_", extra="forbid", toml_file=Path(path) if path else None
        )

    try:
        loaded = _WithFile(**{name: value for name, value in flags.items() if value is not None})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        # tomllib recurses on nested arrays: a file of thousands of '[' exhausts the stack.
        problem = "it nests too deeply" if isinstance(exc, RecursionError) else one_line(exc)
        raise ConfigurationError(
            f"settings file {path} is not valid TOML: {problem}",
            hint="fix the file (UTF-8 text, key = value lines) or pass another with --config",
        ) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigurationError(
            f"invalid model setting {where}: {first['msg']}",
            hint=f"check the flag, the INTERLEAVE_{where.upper()} variable or the settings file",
        ) from exc
    values = loaded.model_dump()
    if loaded.paper:
        # The paper's models unless the flags, environment or file named others.
        for name, default in (("planner", PAPER_PLANNER), ("critic", PAPER_CRITIC),
                              ("generator", PAPER_GENERATOR)):
            if name not in loaded.model_fields_set:
                values[name] = default
    return ModelSettings.model_construct(**values)


# Where served chat models and the OpenAI Images generator find their key, in this order. Our own
# variable first, so a served model's key never has to pose as an OpenAI key.
API_KEY_ENV = ("INTERLEAVE_API_KEY", "OPENAI_API_KEY")


def find_api_key(explicit: str | None = None) -> str | None:
    """``explicit`` when given, else the first of ``$INTERLEAVE_API_KEY`` and ``$OPENAI_API_KEY``
    that is set and not blank (stripped), else None.

    Read at call time, never stored in settings: a key must not reach threads or reports.
    """
    if explicit:
        return explicit
    for variable in API_KEY_ENV:
        value = os.environ.get(variable, "").strip()
        if value:
            return value
    return None


# Query parameters whose values are credentials (api-key=..., token=..., sig=...).
_SECRET_PARAM = re.compile(r"(?i)(key|token|secret|passw|pwd|sig|auth|credential)")


def redact_url(url: str) -> str:
    """``url`` with its credentials (user info, secret-looking query values) shown as ***.

    Server URLs become part of a model's identity, which threads store and traces and reports
    show; a key written into a URL must not travel with it.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAM.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide: the URL exactly as given, so identities stay the same
    return urlunsplit(parts._replace(netloc=netloc, query=query))
