"""The kernel probe: its choice rule, and with a real model that the choice is recorded, reused, invalidated
when the CPU or llama.cpp changes, and overridden by a user's setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ragqa import kernels, models
from ragqa.errors import RagqaError
from ragqa.kernels import Kernel

from .conftest import SMALL_MODEL, make_settings


def _row(name: str, prefill: float, gen: float, auto: bool = True) -> dict[str, Any]:
    return {"name": name, "auto": auto, "prefill_tok_s": prefill, "gen_tok_s": gen}


def test_choice_weighs_prompt_and_answer_and_needs_a_clear_gain() -> None:
    # The AVX-512 figures: repacking's faster generation does not pay for its slower prompt.
    assert kernels.choose([_row("baseline", 240, 26), _row("repack", 150, 32)]) == "baseline"
    # Faster at both, by more than the margin: chosen.
    assert kernels.choose([_row("baseline", 240, 26), _row("repack", 260, 30)]) == "repack"
    # 2% faster is within the noise of repeated runs.
    assert kernels.choose([_row("baseline", 240, 26), _row("n_ubatch 256", 245, 26.5)]) == "baseline"
    # Never chosen automatically, however fast; a candidate that failed (no rates) neither.
    rows = [_row("baseline", 240, 26), _row("flash_attn", 400, 40, auto=False), _row("1 thread", 0, 0)]
    assert kernels.choose(rows) == "baseline"


def test_probe_brackets_the_baseline_against_drift(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The baseline runs first and last: caught in a slow minute once, it keeps its better rates, and a
    candidate only as fast as the baseline's good run is not chosen."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    speeds = iter([(140, 16), (150, 19), (150, 19), (80, 13), (200, 20), (170, 21), (145, 19.5)])

    def fake_measure(path: Path, kernel: Kernel, *args: Any) -> dict[str, Any]:
        prefill, gen = next(speeds)
        return {"prefill_tok_s": prefill, "gen_tok_s": gen, "load_s": 0.5, "tokens": [1, 2]}

    monkeypatch.setattr(kernels, "measure", fake_measure)
    record, where = kernels.probe(make_settings(models=tmp_path / "models"), model)
    base = record["candidates"][0]
    assert (base["prefill_tok_s"], base["gen_tok_s"]) == (145, 19.5) and len(base["runs"]) == 2
    assert record["chosen"] == "baseline" and len(record["candidates"]) == len(kernels.candidates())
    assert json.loads(where.read_text(encoding="utf-8")) == record


def test_a_candidate_that_crashes_costs_the_probe_that_candidate_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each candidate is measured in a child process: one that dies by a signal (llama.cpp's AMX matmul did,
    with repacking, on an Intel AMX guest) is recorded as crashed, never chosen, and a user who asks for it
    gets one line instead of a dead process."""
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n", encoding="utf-8")
    crashing.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(kernels.sys, "executable", str(crashing))
    with pytest.raises(RuntimeError, match=r"llama.cpp crashed \(SIGSEGV\)"):
        kernels.measure(model, Kernel(repack=True), 512, 8, 2, 1)
    monkeypatch.undo()

    real = kernels.measure

    def measure(path: Path, kernel: Kernel, *args: Any) -> dict[str, Any]:
        if kernel.repack:
            python, kernels.sys.executable = kernels.sys.executable, str(crashing)
            try:
                return real(path, kernel, *args)
            finally:
                kernels.sys.executable = python
        return {"prefill_tok_s": 100.0, "gen_tok_s": 14.0, "load_s": 0.5, "tokens": [1, 2]}

    monkeypatch.setattr(kernels, "measure", measure)
    settings = make_settings(models=tmp_path / "models", kernel_probe="auto")
    record, _ = kernels.probe(settings, model)
    row = next(r for r in record["candidates"] if r["name"] == "repack")
    assert row["error"] == "RuntimeError: llama.cpp crashed (SIGSEGV)" and record["chosen"] == "baseline"
    monkeypatch.setattr(kernels, "ensure", lambda *a, **k: (record, tmp_path / "record.json"))
    assert kernels.resolve(settings, model)[0] == Kernel()
    with pytest.raises(RagqaError, match=r"failed with repack=True on this host .*SIGSEGV.*change repack"):
        kernels.resolve(settings.replace(repack=True), model)


def test_kernel_arguments_reach_llama_in_its_own_terms() -> None:
    plain = Kernel().llama_kwargs()
    assert plain["type_k"] == 1 and "type_v" not in plain and plain["n_threads_batch"] == plain["n_threads"]
    # llama.cpp refuses a quantized V cache without flash attention: V is quantized only with it.
    assert "type_v" not in Kernel(kv_type="q8_0").llama_kwargs()
    assert Kernel(kv_type="q8_0", flash_attn=True).llama_kwargs()["type_v"] == 8
    assert Kernel(repack=True).model_fields() == {"use_extra_bufts": True}
    assert Kernel(repack=True, n_ubatch=256).label() == "repack=True, n_ubatch=256"


def test_probe_off_applies_the_settings_without_measuring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernels, "ensure", lambda *a, **k: pytest.fail("probed with kernel_probe off"))
    kernel, sources = kernels.resolve(make_settings(kernel_probe="off", n_ubatch=128), tmp_path / "m.gguf")
    assert kernel == Kernel(n_ubatch=128) and sources["n_ubatch"] == "flag" and sources["repack"] == "default"


def test_bad_kernel_values_are_one_line() -> None:
    with pytest.raises(RagqaError, match="kv_type must be one of f16, q8_0"):
        kernels.resolve(make_settings(kernel_probe="off", kv_type="q4"), Path("m.gguf"))
    with pytest.raises(RagqaError, match="kernel_probe must be one of auto, off"):
        kernels.resolve(make_settings(kernel_probe="sometimes"), Path("m.gguf"))


# ---- with the real 0.5B model -------------------------------------------------------------------------------
@pytest.fixture
def small_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path) -> Any:
    """A models folder of its own (the shared GGUF linked in) and a probe small enough for a test: the record
    it writes is this test's, never the real cache's."""
    spec = models.REGISTRY[SMALL_MODEL]
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / models.final_path(spec, models_dir).name).symlink_to(models.final_path(spec, models_dir))
    monkeypatch.setattr(kernels, "PROBE_PROMPT_TOKENS", 48)
    monkeypatch.setattr(kernels, "PROBE_NEW_TOKENS", 6)
    monkeypatch.setattr(kernels, "PROBE_REPEATS", 1)
    monkeypatch.setenv("RAGQA_MODELS", str(mine))
    monkeypatch.setenv("RAGQA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAGQA_KERNEL_PROBE", "auto")
    settings = make_settings(model=SMALL_MODEL, n_ctx=512)
    return settings, models.final_path(spec, mine)


@pytest.mark.slow
def test_probe_is_recorded_reused_and_invalidated(small_probe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, path = small_probe
    record, where = kernels.ensure(settings, path)
    assert where.parent == settings.models_dir / "kernels" and where.name.startswith(path.stem + "-")
    saved = json.loads(where.read_text(encoding="utf-8"))
    assert saved == record
    names = [c["name"] for c in saved["candidates"]]
    assert names == [c.name for c in kernels.candidates()] and saved["chosen"] in names
    # Each candidate is measured or, where it failed here, carries the reason (repacking's AMX matmul crashed
    # llama.cpp on an Intel AMX guest, 2026-12-02); the baseline and the chosen one were measured.
    for c in saved["candidates"]:
        assert (c["prefill_tok_s"] > 0 and c["gen_tok_s"] > 0) != ("error" in c), c
    assert "error" not in saved["candidates"][0]
    assert "error" not in next(c for c in saved["candidates"] if c["name"] == saved["chosen"])
    assert saved["candidates"][0]["same_tokens"] is True
    chosen = next(c for c in saved["candidates"] if c["name"] == saved["chosen"])
    rates = kernels.measured_rates(settings)
    assert rates is not None
    assert (rates.prefill_tok_s, rates.gen_tok_s) == (chosen["prefill_tok_s"], chosen["gen_tok_s"])
    assert kernels.measured_rates(settings.replace(kernel_probe="off")) is None  # off: the budget stays fixed
    # The model load hands the rates to the time budget (ragqa/budget.py), which the answer then records.
    from ragqa.llm import LlamaCppChat

    assert LlamaCppChat(settings).rates == rates

    # Reused: a second ensure reads the record, and a model load applies it, without measuring.
    def no_probe(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("probed again")

    monkeypatch.setattr(kernels, "probe", no_probe)
    assert kernels.ensure(settings, path) == (record, where)
    kernel, sources = kernels.resolve(settings, path)
    assert kernel.as_dict() == saved["kernel"]
    assert sources["repack"] == f"probe {saved['date']} ({where})"
    assert sources["flash_attn"].startswith("default") and sources["kv_type"].startswith("default")  # measured only

    # Invalidated: another llama.cpp build, or another CPU, is another key; the old record no longer applies.
    real_info, real_flags = kernels.system_info(), kernels.cpu_flags()
    monkeypatch.setattr(kernels, "system_info", lambda: real_info + " | AVX512 = 0")
    assert kernels.load_record(settings, path) is None and kernels.measured_rates(settings) is None
    with pytest.raises(AssertionError, match="probed again"):
        kernels.ensure(settings, path)
    monkeypatch.setattr(kernels, "system_info", lambda: real_info)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: real_flags.replace("avx2", ""))
    assert kernels.load_record(settings, path) is None
    monkeypatch.setattr(kernels, "cpu_flags", lambda: real_flags)
    assert kernels.load_record(settings, path) == (record, where)


@pytest.mark.slow
def test_user_setting_overrides_the_probe_and_reaches_llama_cpp(small_probe: Any) -> None:
    from ragqa.llm import LlamaCppChat

    settings, path = small_probe
    record, where = kernels.ensure(settings, path)
    # Whatever the probe chose for repacking, the user asks for the other; the rest stays the probe's. Where
    # the probe saw that setting fail (repacking crashed llama.cpp on an Intel AMX host), asking for it is one
    # clear line, and the user's setting tried is the micro-batch size instead.
    wanted = not record["kernel"]["repack"]
    crashed = any(c["kernel"] == {**record["kernel"], "repack": wanted} and "error" in c for c in record["candidates"])
    if crashed:
        with pytest.raises(RagqaError, match=r"failed with repack=True on this host when probed .*; change repack"):
            LlamaCppChat(settings.replace(repack=wanted, prompt_cache=False))
        key, value = "n_ubatch", 256 if record["kernel"]["n_ubatch"] != 256 else 128
    else:
        key, value = "repack", wanted
    llm = LlamaCppChat(settings.replace(**{key: value}, prompt_cache=False))
    assert getattr(llm.kernel, key) == value and llm.kernel_sources[key] == "override"
    kept = "n_threads" if key == "n_ubatch" else "n_ubatch"
    assert llm.kernel_sources[kept] == f"probe {record['date']} ({where})"
    # What llama.cpp was handed: the model's parameters and the context's.
    expected = {**record["kernel"], key: value}
    assert llm.client.model_params.use_extra_bufts is expected["repack"]
    assert llm.client.context_params.n_ubatch == expected["n_ubatch"]
    assert llm.client.context_params.n_threads_batch == expected["n_threads"]
    shown = kernels.describe(settings.replace(**{key: value}))
    assert shown[key] == (value, "override") and shown["n_threads"][1].startswith("probe ")


@pytest.mark.slow
def test_models_probe_command_prints_the_candidates(small_probe: Any) -> None:
    from ragqa.cli import app

    result = CliRunner().invoke(app, ["models", "probe", "--model", SMALL_MODEL])
    assert result.exit_code == 0, result.output
    for name in ("baseline", "repack", "q8_0 KV", "chosen"):
        assert name in result.output
    again = CliRunner().invoke(app, ["models", "probe", "--model", SMALL_MODEL])  # the record, not a new probe
    assert again.exit_code == 0 and len(list((small_probe[0].models_dir / "kernels").glob("*.json"))) == 1
