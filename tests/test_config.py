import os
from pathlib import Path

import pytest

from ragqa.config import load_settings
from ragqa.errors import RagqaError


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "ragqa.toml"
    toml.write_text('k = 7\nchunk_size = 300\nmodel = "from-toml"\n', encoding="utf-8")
    env = {"RAGQA_CONFIG": str(toml), "RAGQA_CHUNK_SIZE": "350", "RAGQA_MODEL": "from-env"}
    s = load_settings({"model": "from-flag", "k": None}, env=env)
    assert s.k == 7 and s.sources["k"] == str(toml)
    assert s.chunk_size == 350 and s.sources["chunk_size"] == "env RAGQA_CHUNK_SIZE"
    assert s.model == "from-flag" and s.sources["model"] == "flag"
    assert s.chunk_overlap == 80 and "chunk_overlap" not in s.sources  # default


def test_paths_derive_from_home(tmp_path: Path) -> None:
    s = load_settings({}, env={"RAGQA_HOME": str(tmp_path)})
    assert s.index_dir == tmp_path / "index" and s.models_dir == tmp_path / "models"
    s = load_settings({"index": tmp_path / "other"}, env={"RAGQA_HOME": str(tmp_path), "RAGQA_MODELS": "/m"})
    assert s.index_dir == tmp_path / "other" and s.models_dir == Path("/m")


def test_toml_section_and_optional_values(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[ragqa]\nllm_url = "http://127.0.0.1:8080/v1"\ntemperature = 0.3\n', encoding="utf-8")
    s = load_settings({}, env={"RAGQA_CONFIG": str(toml), "RAGQA_CHAT_FORMAT": ""})
    assert s.llm_url == "http://127.0.0.1:8080/v1" and s.temperature == 0.3 and s.chat_format is None


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RAGQA_K": "many"}, "invalid value 'many' for 'k' (RAGQA_K)"),
        ({"RAGQA_CONFIG": "/nonexistent/ragqa.toml"}, "does not exist"),
    ],
)
def test_bad_values_are_one_clear_line(env: dict[str, str], needle: str) -> None:
    with pytest.raises(RagqaError, match=None) as info:
        load_settings({}, env=env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_unknown_toml_key(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("chunksize = 3\n", encoding="utf-8")
    with pytest.raises(RagqaError, match="unknown key 'chunksize'"):
        load_settings({}, env={"RAGQA_CONFIG": str(toml)})


def test_switches_read_as_booleans_from_every_layer(tmp_path: Path) -> None:
    assert load_settings({}, env={}).prompt_cache is True
    assert load_settings({}, env={"RAGQA_PROMPT_CACHE": "off"}).prompt_cache is False
    assert load_settings({"prompt_cache": "1"}, env={"RAGQA_PROMPT_CACHE": "no"}).prompt_cache is True
    toml = tmp_path / "ragqa.toml"
    toml.write_text("prompt_cache = false\n", encoding="utf-8")
    assert load_settings({}, env={"RAGQA_CONFIG": str(toml)}).prompt_cache is False
    with pytest.raises(RagqaError, match="invalid value 'maybe' for 'prompt_cache'"):
        load_settings({}, env={"RAGQA_PROMPT_CACHE": "maybe"})


def test_embed_threads_zero_means_the_physical_cores() -> None:
    from ragqa.config import physical_cores

    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert load_settings({}, env={}).embedder_threads == cores
    assert load_settings({"embed_threads": 3}, env={}).embedder_threads == 3
