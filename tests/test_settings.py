"""Model settings: defaults, a TOML file, INTERLEAVE_* variables and flags, in that rising order."""

from __future__ import annotations

from pathlib import Path

import pytest

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.settings import DEFAULT_CRITIC, DEFAULT_PLANNER, find_api_key, load_model_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INTERLEAVE_CONFIG", "INTERLEAVE_PLANNER", "INTERLEAVE_CRITIC", "INTERLEAVE_STEPS"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_name_the_released_checkpoints() -> None:
    settings = load_model_settings()
    assert settings.planner == DEFAULT_PLANNER == "InterleaveThinker/InterleaveThinker-Planner-8B"
    assert settings.critic == DEFAULT_CRITIC == "InterleaveThinker/Critic-SFT-8B"
    assert settings.generator == "black-forest-labs/FLUX.2-klein-4B"


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "interleave.toml"
    config.write_text('planner = "file-planner"\ncritic = "file-critic"\nsteps = 8\n')
    monkeypatch.setenv("INTERLEAVE_CRITIC", "env-critic")
    monkeypatch.setenv("INTERLEAVE_STEPS", "6")
    # Unrelated INTERLEAVE_* variables (run dir, test hooks) must not be taken for settings.
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(tmp_path))
    settings = load_model_settings(config, steps=4, planner=None)
    assert (settings.planner, settings.critic, settings.steps) == ("file-planner", "env-critic", 4)
    monkeypatch.setenv("INTERLEAVE_CONFIG", str(config))
    assert load_model_settings().planner == "file-planner"


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_model_settings(tmp_path / "missing.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text("planer = 'x'\n")
    with pytest.raises(ConfigurationError, match="planer"):
        load_model_settings(typo)
    with pytest.raises(ConfigurationError, match="steps"):
        load_model_settings(steps=0)


def test_the_api_key_is_given_else_ours_else_openais(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INTERLEAVE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert find_api_key() is None and find_api_key("sk-given") == "sk-given"
    monkeypatch.setenv("OPENAI_API_KEY", " sk-openai ")
    assert find_api_key() == "sk-openai"
    monkeypatch.setenv("INTERLEAVE_API_KEY", "sk-ours")
    assert find_api_key() == "sk-ours" and find_api_key("sk-given") == "sk-given"
    monkeypatch.setenv("INTERLEAVE_API_KEY", "   ")  # blank counts as unset
    assert find_api_key() == "sk-openai" and find_api_key("") == "sk-openai"
