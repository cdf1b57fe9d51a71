"""Export a sentence-transformers embedder (EmbeddingGemma) to one ONNX graph, tell whether an export is usable,
and open it.

Why: importing torch + sentence-transformers costs seconds on every cold `ragqa ask`; ONNX Runtime runs the
same fp32 graph with only onnxruntime and the Rust `tokenizers` imported. The whole pipeline (Gemma3 text
model → mean pooling → Dense → Dense → L2 normalize) goes into one graph taking (input_ids, attention_mask),
so the runtime adapter only tokenizes.

The export lives in `<model folder>/onnx/` and is written atomically: a work folder is filled, the stamp is
written last, and only then is it renamed into place. The stamp records the source weights (sha256, size,
mtime) and the exporter versions; `export_status` compares it with the folder cheaply (no hashing of the
1.2 GB weights at load time), so a stale or partial export is never used, only redone.

`quantize_int8` derives `<model folder>/onnx-int8/` from that export (embed_precision = "int8"), with the
same stamp, checks and atomic publish; its stamp adds the quantization recipe, so a changed recipe redoes it.

This module imports torch only inside `export_onnx`; `export_status`, `ready` and `onnx_dir` are cheap and
torch-free because the runtime calls them on every load, and the module imports no LangChain, so `prestart`
can run before a cold process's slow imports.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ragqa import models
from ragqa.errors import RagqaError, storage_error

ONNX_DIR = "onnx"
PRECISIONS = ("fp32", "int8")
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights, beside the graph (see _externalize)
STAMP_FILE = "stamp.json"
STAMP_VERSION = 2  # bump when the graph's inputs/outputs, the wrapper's maths or the file layout change
DATA_ALIGN = 64 * 1024  # ONNX Runtime maps external data in place only at allocation-granularity offsets
SOURCE_WEIGHTS = "model.safetensors"
SUPPORTED_MODEL_TYPES = ("gemma3_text",)  # the mask building below is Gemma3's (bidirectional + sliding window)


# The int8 recipe (quantize_int8): dynamic quantization of the MatMul weights, int8 per output channel, with
# reduce_range (7-bit weights: no overflow of the u8 x s8 multiply-adds on AVX2/AVX-512 without VNNI). The
# MatMuls whose node names hold one of `exclude` stay fp32: the final Dense projections, whose error no later
# layer averages out. Measured against fp32 on corpus/ and the tune questions in evals/RESULTS.md.
INT8_RECIPE: dict[str, Any] = {"op_types": ["MatMul"], "weight_type": "QInt8", "per_channel": True,
                               "reduce_range": True, "exclude": ["denses"]}


def onnx_dir(model_dir: Path, precision: str = "fp32") -> Path:
    return model_dir / (ONNX_DIR if precision == "fp32" else f"{ONNX_DIR}-{precision}")


def _source_facts(model_dir: Path) -> dict[str, Any]:
    st = (model_dir / SOURCE_WEIGHTS).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def export_status(model_dir: Path, precision: str = "fp32") -> str | None:
    """None when `onnx_dir(model_dir, precision)` holds a complete export of the weights now in `model_dir`
    (for int8: made with today's INT8_RECIPE), else why not.

    Cheap on purpose (stat calls and one small JSON read): it runs on every embedder load.
    """
    out = onnx_dir(model_dir, precision)
    what = "ONNX export" if precision == "fp32" else f"{precision} ONNX export"
    stamp_path = out / STAMP_FILE
    if not stamp_path.is_file():
        return f"no {what}"
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        if stamp.get("stamp_version") != STAMP_VERSION:
            return f"{what} was made by another ragqa version"
        if stamp.get("source") != _source_facts(model_dir):
            return f"{what} is of other weights than the folder now holds"
        if precision == "int8" and stamp.get("recipe") != INT8_RECIPE:
            return f"{what} was made with another quantization recipe"
        for name, size in stamp["files"].items():
            path = out / name
            if not path.is_file() or path.stat().st_size != size:
                return f"{what} file {name} is missing or truncated"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{what} stamp is unreadable"
    return None


def ready(model_dir: Path, precision: str = "fp32") -> bool:
    """An up-to-date export sits in the folder and onnxruntime + tokenizers import (checked without importing)."""
    import importlib.util

    if export_status(model_dir, precision) is not None:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers"))


def exportable(model_dir: Path) -> bool:
    """Whether the folder is a pipeline this exporter reproduces exactly (Gemma3, mean pooling, Dense, Normalize)."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    return (
        config.get("model_type") in SUPPORTED_MODEL_TYPES
        and kinds[:2] == ["Transformer", "Pooling"]
        and all(k == "Dense" for k in kinds[2:-1])
        and kinds[-1] == "Normalize"
        and pooling.get("pooling_mode_mean_tokens") is True
        and not any(v is True for k, v in pooling.items() if k.startswith("pooling_mode_") and "mean_tokens" not in k)
    )


def _pipeline_module(model_dir: Path) -> Any:
    """The sentence-transformers pipeline as one nn.Module of (input_ids, attention_mask) → unit vectors.

    Attention masks are built here, not by transformers: its mask helpers take data-dependent shortcuts
    (e.g. "no padding → no mask") that a trace would freeze into the graph. EmbeddingGemma attends
    bidirectionally; its sliding layers see keys with |q - k| < sliding_window, its full layers every
    non-padding key, which is what transformers builds for `use_bidirectional_attention`.
    """
    models.quiet_hf_libraries()
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=False, local_files_only=True,
                             model_kwargs={"use_safetensors": True})
    st.eval()
    text_model = st[0].auto_model
    denses = [m.linear for m in list(st)[2:] if type(m).__name__ == "Dense"]
    for m in list(st)[2:]:
        if type(m).__name__ == "Dense" and not isinstance(m.activation_function, torch.nn.Identity):
            raise RagqaError(f"{model_dir.name}: a Dense layer with an activation is not supported by the exporter")
    window = int(text_model.config.sliding_window)

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model = text_model
            self.denses = torch.nn.ModuleList(denses)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            seq = input_ids.shape[1]
            pos = torch.arange(seq, device=input_ids.device)
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): padding keys are never attended
            near = (pos[:, None] - pos[None, :]).abs() < window  # (S, S)
            neg = torch.finfo(torch.float32).min
            zero = torch.zeros((), dtype=torch.float32)
            full = torch.where(keys, zero, neg)
            sliding = torch.where(keys & near[None, None], zero, neg)
            out = self.text_model(
                input_ids=input_ids,
                attention_mask={"full_attention": full, "sliding_attention": sliding},
                position_ids=pos[None, :],
                use_cache=False,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
            for dense in self.denses:
                pooled = dense(pooled)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Pipeline().eval(), st


def export_onnx(model_dir: Path, sha256: str | None = None, opset: int = 18) -> Path:
    """Export `model_dir` to `<model_dir>/onnx/` unless a current export is there; return that folder.

    `sha256` is the verified digest of the weights (the registry's, checked by fetch); it goes in the stamp
    for the record. Failures of the exporter itself become one line: the torch runtime still works.
    """
    out = onnx_dir(model_dir)
    if export_status(model_dir) is None:
        return out
    if not exportable(model_dir):
        raise RagqaError(f"{model_dir.name} is not a pipeline the ONNX exporter supports (Gemma3 + mean pooling)")
    try:
        return _export(model_dir, out, sha256, opset)
    except OSError as exc:
        raise storage_error(exc, model_dir, "exporting to ONNX") or RagqaError(
            f"exporting {model_dir.name} to ONNX failed: {exc.strerror or exc}") from None


def export_model(name: str, models_dir: Path, precision: str = "fp32") -> Path | None:
    """Give a fetched sentence-transformers embedder of the registry its ONNX export, and for "int8" its
    quantized one too (a no-op when current); the folder `precision` runs from, or None if it has none.

    Kept apart from `models.fetch` because it needs torch and minutes of CPU: `ragqa models fetch` / `setup`
    call it, library callers that only want the weights do not pay for it. The runtime falls back to torch
    without it.
    """
    spec = models.get_spec(name)
    path = models.final_path(spec, models_dir)
    if not _registry_exportable(spec, path):
        return None
    if not models.is_fetched(spec, models_dir):
        raise RagqaError(f"model {name} is not fetched yet; run: ragqa models fetch {name}")
    out = export_onnx(path, sha256=spec.sha256)
    return quantize_int8(path) if precision == "int8" else out


def export_due(name: str, models_dir: Path, precision: str = "fp32") -> bool:
    """Whether `export_model` has work to do: an embedder it can export whose export (or, for "int8", whose
    quantized export) is missing or stale."""
    spec = models.get_spec(name)
    path = models.final_path(spec, models_dir)
    return _registry_exportable(spec, path) and (
        export_status(path) is not None or (precision == "int8" and export_status(path, "int8") is not None))


def _registry_exportable(spec: models.ModelSpec, path: Path) -> bool:
    return spec.kind == "sentence-transformers" and exportable(path)


def _externalize(model_path: Path, data_path: Path) -> None:
    """Move the weights out of the graph file into `data_path`, each tensor at a DATA_ALIGN boundary.

    Why: ONNX Runtime parses an inline 1.2 GB protobuf and copies every weight at session creation (3.3-3.9 s
    here); aligned external data it memory-maps and uses in place, so the session loads in ~0.9 s and the
    262k-row token embedding table (two thirds of the weights) is paged in only for the rows a text uses.
    onnx's own writer does not align, hence the offsets are set here.
    """
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(model_path))
    with open(data_path, "wb") as fh:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                continue  # small constants stay inline: mapping them would cost more than copying
            fh.write(b"\0" * (-fh.tell() % DATA_ALIGN))
            offset = fh.tell()
            fh.write(tensor.raw_data)
            set_external_data(tensor, DATA_FILE, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
    onnx.save_model(model, str(model_path))


def _export(model_dir: Path, out: Path, sha256: str | None, opset: int) -> Path:
    import onnx
    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix=f".{ONNX_DIR}.", suffix=".partial", dir=model_dir))
    try:
        source = _source_facts(model_dir)
        pipeline, _ = _pipeline_module(model_dir)
        # Example long enough that no shape shortcut (e.g. sequence <= sliding window) is taken while tracing.
        ids = torch.full((2, 16), 100, dtype=torch.long)
        mask = torch.ones((2, 16), dtype=torch.long)
        mask[1, 10:] = 0
        target = work / ONNX_FILE
        try:
            # The tracer warns about Python-level branches in transformers' attention code; the masks built
            # in _pipeline_module make them shape-independent, and the user cannot act on the warnings.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    pipeline,
                    (ids, mask),
                    str(target),
                    input_names=["input_ids", "attention_mask"],
                    output_names=["sentence_embedding"],
                    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                  "attention_mask": {0: "batch", 1: "sequence"},
                                  "sentence_embedding": {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RagqaError(f"exporting {model_dir.name} to ONNX failed: {str(exc).splitlines()[0][:200]}") from None
        _externalize(target, work / DATA_FILE)
        files = {p.name: p.stat().st_size for p in work.iterdir() if p.is_file()}
        stamp = {
            "stamp_version": STAMP_VERSION,
            "source": source,
            "source_sha256": sha256,
            "opset": opset,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__},
            "files": files,
        }
        (work / STAMP_FILE).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
        return models.publish_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantize_int8(model_dir: Path) -> Path:
    """Make `<model_dir>/onnx-int8/` from the current fp32 export, by INT8_RECIPE, unless it is there; return it.

    Why dynamic quantization of the weights only: activations are quantized per call from their own range,
    so no calibration set is needed and the vectors stay close to fp32 (cosine 0.9602 at the least measured,
    >= 0.955 held by tests/test_embed.py), while the MatMuls, most of the compute, run on u8 x s8 integer
    kernels (~2x the chunks/s on 2 cores).
    The 262k-row token table is a Gather, not a MatMul: it stays fp32, so the export shrinks 1.2 -> 0.9 GB.
    """
    out = onnx_dir(model_dir, "int8")
    if export_status(model_dir, "int8") is None:
        return out
    stale = export_status(model_dir)
    if stale:
        raise RagqaError(f"cannot quantize {model_dir.name} to int8: {stale}; run: ragqa models fetch")
    try:
        return _quantize(model_dir, out)
    except OSError as exc:
        raise storage_error(exc, model_dir, "quantizing to int8") or RagqaError(
            f"quantizing {model_dir.name} to int8 failed: {exc.strerror or exc}") from None


def _quantize(model_dir: Path, out: Path) -> Path:
    import logging

    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx_dir(model_dir) / ONNX_FILE
    graph = onnx.load(str(source), load_external_data=False).graph
    exclude = [n.name for n in graph.node if n.op_type in INT8_RECIPE["op_types"]
               and any(part in n.name for part in INT8_RECIPE["exclude"])]
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=model_dir))
    quiet = logging.getLogger().level
    try:
        fp32_stamp = json.loads((onnx_dir(model_dir) / STAMP_FILE).read_text(encoding="utf-8"))
        target = work / ONNX_FILE
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process is not the user's
        try:
            quantize_dynamic(
                source, target,
                op_types_to_quantize=list(INT8_RECIPE["op_types"]),
                per_channel=bool(INT8_RECIPE["per_channel"]),
                reduce_range=bool(INT8_RECIPE["reduce_range"]),
                weight_type=getattr(QuantType, str(INT8_RECIPE["weight_type"])),
                nodes_to_exclude=exclude,
            )
        except (RuntimeError, ValueError, TypeError, onnx.checker.ValidationError) as exc:
            raise RagqaError(
                f"quantizing {model_dir.name} to int8 failed: {str(exc).splitlines()[0][:200]}") from None
        finally:
            logging.getLogger().setLevel(quiet)
        _externalize(target, work / DATA_FILE)
        files = {p.name: p.stat().st_size for p in work.iterdir() if p.is_file()}
        stamp = {**fp32_stamp, "recipe": INT8_RECIPE, "excluded_nodes": exclude, "files": files,
                 "versions": {**fp32_stamp.get("versions", {}), "onnxruntime": onnxruntime.__version__}}
        (work / STAMP_FILE).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
        return models.publish_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def session(model_file: Path, threads: int | None) -> Any:
    """An ONNX Runtime session on the CPU: `threads` for one operator, one operator at a time."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])


_prestarted: dict[tuple[str, int | None], Future] = {}


def prestart(name: str, models_dir: Path, threads: int | None = None, runtime: str = "auto",
             precision: str = "fp32") -> None:
    """Begin building the ONNX Runtime session of embedder `name` in a thread; a cold `ragqa ask` calls this
    before anything heavy.

    Why: the session build (~0.9 s) runs mostly without the GIL, and what a cold process does next, importing
    chromadb and LangChain (~1.3 s), is Python that hands the GIL round every few ms, so the two overlap.
    `embed.OnnxEmbeddings` takes the session when it is built for the same file and threads; an error raised here
    surfaces there, in the caller's thread, like an error of the normal load. For other runtimes, a missing
    model or a stale export it does nothing: the normal load reports those.
    """
    try:
        _, path, kind = models.resolve(name, models_dir, kind="embedder")
    except RagqaError:
        return
    if kind != "sentence-transformers" or runtime == "torch" or not ready(path, precision):
        return
    model_file = onnx_dir(path, precision) / ONNX_FILE
    key = (str(model_file), threads)
    if key in _prestarted:
        return
    # Imported here, in the caller's thread: a thread importing onnxruntime (and numpy under it) while the
    # caller imports chromadb can hand one of them a partially initialised numpy (an ImportError).
    import onnxruntime  # noqa: F401

    future: Future = Future()

    def build() -> None:
        try:
            future.set_result(session(model_file, threads))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the session
            future.set_exception(exc)

    if not _prestarted:
        atexit.register(_settle)
    _prestarted[key] = future
    threading.Thread(target=build, name="ragqa-onnx-prestart", daemon=True).start()


def _settle() -> None:
    """At exit, wait for a session still being built (at most its ~1 s): tearing the interpreter and ONNX
    Runtime down under a running build could crash the exit of, say, `ragqa ask ""` after its one-line error."""
    for future in list(_prestarted.values()):
        future.exception()  # waits; the outcome no longer matters


def take_prestarted(model_file: Path, threads: int | None) -> Any:
    """The session `prestart` built for this file and thread count (waiting for it), else None; once only."""
    future = _prestarted.pop((str(model_file), threads), None)
    return future.result() if future is not None else None
