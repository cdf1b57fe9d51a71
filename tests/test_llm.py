import struct
from pathlib import Path

import pytest

from ragqa import models
from ragqa.errors import RagqaError
from ragqa.llm import LlamaCppChat, gguf_metadata

from .conftest import make_settings


def _tiny_gguf(path: Path, arch: str) -> Path:
    """A syntactically valid GGUF header with one key and no tensors (no chat template)."""
    key, value = b"general.architecture", arch.encode()
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    data += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    path.write_bytes(data)
    return path


def test_gguf_metadata_of_a_real_model(models_dir: Path) -> None:
    meta = gguf_metadata(models.final_path(models.REGISTRY["qwen2.5-coder-0.5b-instruct"], models_dir))
    assert meta["general.architecture"] == "qwen2"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_file_without_chat_template_names_the_flag(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "bare.gguf", "llama")
    with pytest.raises(RagqaError, match="--chat-format"):
        LlamaCppChat(make_settings(model=str(path)))


def test_unknown_architecture_is_one_line(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "alien.gguf", "alien-arch-9000")
    with pytest.raises(RagqaError, match="alien-arch-9000") as info:
        LlamaCppChat(make_settings(model=str(path), chat_format="chatml"))
    assert "\n" not in str(info.value)


def test_truncated_gguf_is_refused(tmp_path: Path, models_dir: Path) -> None:
    src = models.final_path(models.REGISTRY["smollm2-135m-instruct"], models_dir)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: 3_000_000])
    with pytest.raises(RagqaError):
        LlamaCppChat(make_settings(model=str(cut)))


@pytest.mark.slow
def test_real_model_streams_and_reports_usage(models_dir: Path) -> None:
    llm = LlamaCppChat(make_settings(model="smollm2-135m-instruct", models=models_dir, max_tokens=16))
    pieces = list(llm.stream([{"role": "user", "content": "Say hello."}], max_tokens=16))
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert llm.usage["completion_tokens"] == len(pieces)
    assert llm.usage["prompt_tokens"] and llm.usage["prompt_tokens"] > 3
    assert llm.count_tokens("hello world") >= 2
