"""Sanity checks for the corpus QA evaluation sets: evals/corpus_qa.jsonl (the first 90 questions, which
mostly reuse their evidence's words) and evals/paraphrase_qa.jsonl (questions asked the way users ask:
paraphrased, cross-lingual, unanswerable near-misses), and the fixed tune/test split over both.

Pure text checks: no models, no network, runs in well under a second.
"""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "corpus"
EVAL_FILE = ROOT / "evals" / "corpus_qa.jsonl"
PARAPHRASE_FILE = ROOT / "evals" / "paraphrase_qa.jsonl"

EXPECTED_KEYS = {"id", "question", "lang", "type", "source", "evidence", "answer", "must_include", "split"}
PARAPHRASE_KEYS = EXPECTED_KEYS | {"tags", "note"}
# A question tagged with one of these asks about an idea without the documents' words for it.
REWORDED_TAGS = {"paraphrase", "cross_term", "effect", "description"}
TAGS = REWORDED_TAGS | {"near_duplicate"}
LANGS = {"zh", "en"}
TYPES = {"factoid", "numeric", "multi", "summary", "negative"}
CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")

MIN_QUESTIONS = 80
MIN_NEGATIVE = 15
MIN_MULTI = 10
ZH_SHARE_RANGE = (0.55, 0.75)
MIN_QUESTIONS_PER_FILE = 8


@pytest.fixture(scope="module")
def corpus():
    files = sorted(CORPUS_DIR.glob("*.txt"))
    assert files, f"no corpus files found in {CORPUS_DIR}"
    return {p.name: p.read_text(encoding="utf-8") for p in files}


@pytest.fixture(scope="module", params=[EVAL_FILE, PARAPHRASE_FILE], ids=["corpus_qa", "paraphrase_qa"])
def records(request):
    """Each suite in turn: the rules below hold for both."""
    path = request.param
    assert path.is_file(), f"eval file missing: {path}"
    recs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"line {lineno}: empty line in {path.name}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                pytest.fail(f"line {lineno}: invalid JSON: {e}")
            assert isinstance(rec, dict), f"line {lineno}: expected a JSON object, got {type(rec).__name__}"
            recs.append((lineno, rec))
    assert recs, "eval file is empty"
    return recs


def _read(path):
    recs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"line {lineno}: empty line in {path.name}"
            recs.append((lineno, json.loads(line)))
    return recs


@pytest.fixture(scope="module")
def paraphrased():
    assert PARAPHRASE_FILE.is_file(), f"eval file missing: {PARAPHRASE_FILE}"
    return _read(PARAPHRASE_FILE)


def _is_str_list(value):
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def test_keys_and_types(records):
    for lineno, r in records:
        keys = set(r)
        expected = PARAPHRASE_KEYS if r["id"].startswith("p") else EXPECTED_KEYS
        assert keys == expected, (
            f"line {lineno}: keys mismatch; missing={sorted(expected - keys)} extra={sorted(keys - expected)}"
        )
        for k in ("id", "question", "answer"):
            assert isinstance(r[k], str) and r[k].strip(), f"line {lineno}: {k!r} must be a non-empty string"
        assert r["lang"] in LANGS, f"line {lineno} ({r['id']}): lang {r['lang']!r} not in {sorted(LANGS)}"
        assert r["type"] in TYPES, f"line {lineno} ({r['id']}): type {r['type']!r} not in {sorted(TYPES)}"
        for k in ("source", "evidence", "must_include"):
            assert _is_str_list(r[k]), f"line {lineno} ({r['id']}): {k!r} must be a list of strings, got {r[k]!r}"


def test_ids_unique_and_sequential(records):
    ids = [r["id"] for _, r in records]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    assert not dupes, f"duplicate ids: {dupes}"
    prefix = ids[0][0]
    expected = [f"{prefix}{i:03d}" for i in range(1, len(ids) + 1)]
    assert ids == expected, f"ids should be {prefix}001..{prefix}{len(ids):03d} in order; first mismatch: " + str(
        next(((a, b) for a, b in zip(ids, expected, strict=False) if a != b), None)
    )


def test_source_files_exist(records, corpus):
    for _, r in records:
        for s in r["source"]:
            assert "/" not in s and "\\" not in s, f"{r['id']}: source must be a basename, got {s!r}"
            assert s in corpus, f"{r['id']}: source file {s!r} not found in {CORPUS_DIR}"
        assert len(set(r["source"])) == len(r["source"]), f"{r['id']}: duplicate entries in source {r['source']}"


def test_evidence_is_verbatim(records, corpus):
    problems = []
    for _, r in records:
        for ev in r["evidence"]:
            if not 10 <= len(ev) <= 80:
                problems.append(f"{r['id']}: evidence length {len(ev)} outside 10-80: {ev!r}")
            if not any(ev in corpus.get(s, "") for s in r["source"]):
                problems.append(f"{r['id']}: evidence not found verbatim in {r['source']}: {ev!r}")
    assert not problems, "\n".join(problems)


def test_every_source_backed_by_evidence(records, corpus):
    for _, r in records:
        for s in r["source"]:
            assert any(ev in corpus.get(s, "") for ev in r["evidence"]), (
                f"{r['id']}: source {s} is listed but none of its evidence quotes come from it"
            )


def test_negative_vs_answerable_fields(records):
    for _, r in records:
        if r["type"] == "negative":
            for k in ("source", "evidence", "must_include"):
                assert r[k] == [], f"{r['id']}: negative question must have empty {k!r}, got {r[k]!r}"
        else:
            for k in ("source", "evidence", "must_include"):
                assert r[k], f"{r['id']}: answerable question ({r['type']}) must have non-empty {k!r}"
            assert 1 <= len(r["must_include"]) <= 3, (
                f"{r['id']}: must_include should have 1-3 items, got {len(r['must_include'])}"
            )
            for m in r["must_include"]:
                assert m.strip(), f"{r['id']}: empty must_include entry"


def test_multi_questions_have_two_quotes(records):
    for _, r in records:
        if r["type"] == "multi":
            assert len(r["evidence"]) >= 2, f"{r['id']}: multi question needs >= 2 evidence quotes"


def test_english_must_include_has_no_cjk(records):
    for _, r in records:
        if r["lang"] == "en":
            for m in r["must_include"]:
                assert not CJK_RE.search(m), (
                    f"{r['id']}: English question has CJK characters in must_include {m!r}"
                )


def test_reference_answer_contains_must_include(records):
    def norm(s):
        s = re.sub(r"\s+", "", s)
        s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
        return s.lower()

    for _, r in records:
        ans = norm(r["answer"])
        for m in r["must_include"]:
            assert norm(m) in ans, f"{r['id']}: reference answer lacks must_include {m!r}: {r['answer']!r}"


def test_counts(records):
    n = len(records)
    types = Counter(r["type"] for _, r in records)
    assert n >= MIN_QUESTIONS, f"need >= {MIN_QUESTIONS} questions, have {n}"
    assert types["negative"] >= MIN_NEGATIVE, f"need >= {MIN_NEGATIVE} negative questions, have {types['negative']}"
    assert types["multi"] >= MIN_MULTI, f"need >= {MIN_MULTI} multi questions, have {types['multi']}"


def test_language_share(records):
    n = len(records)
    zh = sum(r["lang"] == "zh" for _, r in records)
    share = zh / n
    lo, hi = ZH_SHARE_RANGE
    assert lo <= share <= hi, f"zh share {share:.3f} ({zh}/{n}) outside [{lo}, {hi}]"


def test_every_corpus_file_is_covered(records, corpus):
    per_file = Counter(s for _, r in records for s in r["source"])
    thin = {name: per_file.get(name, 0) for name in corpus if per_file.get(name, 0) < MIN_QUESTIONS_PER_FILE}
    assert not thin, f"corpus files with fewer than {MIN_QUESTIONS_PER_FILE} questions: {thin}"


# --- the paraphrased set: what makes it a test of questions nobody tuned for ------------------------------

_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")


def test_paraphrase_set_counts(paraphrased):
    recs = [r for _, r in paraphrased]
    types = Counter(r["type"] for r in recs)
    langs = Counter(r["lang"] for r in recs)
    assert len(recs) >= 120, len(recs)
    assert langs["en"] >= 45, langs
    assert types["negative"] >= 20 and types["multi"] >= 15 and types["summary"] >= 15, types
    old = {json.loads(line)["question"] for line in EVAL_FILE.read_text(encoding="utf-8").splitlines()}
    assert not [r["id"] for r in recs if r["question"] in old], "questions repeated from corpus_qa.jsonl"


def test_paraphrase_set_tags(paraphrased):
    recs = [r for _, r in paraphrased]
    for r in recs:
        assert set(r["tags"]) <= TAGS, f"{r['id']}: unknown tags {set(r['tags']) - TAGS}"
    answerable = [r for r in recs if r["type"] != "negative"]
    reworded = [r for r in answerable if set(r["tags"]) & REWORDED_TAGS]
    assert 2 * len(reworded) >= len(answerable), f"{len(reworded)}/{len(answerable)} reworded"
    assert sum("near_duplicate" in r["tags"] for r in recs) >= 10
    for r in recs:
        if r["type"] == "negative":
            assert r["note"].strip(), f"{r['id']}: a negative question says what was searched to confirm absence"


def test_reworded_questions_do_not_quote_their_evidence(paraphrased):
    """A question tagged as reworded shares no run of 5+ Chinese characters with its evidence: users do
    not quote the documents they ask about."""
    problems = []
    for _, r in paraphrased:
        if not set(r["tags"]) & REWORDED_TAGS:
            continue
        for run in _CJK_RUN.findall(r["question"]):
            for i in range(len(run) - 4):
                if any(run[i : i + 5] in ev for ev in r["evidence"]):
                    problems.append(f"{r['id']}: {run[i : i + 5]!r}")
                    break
    assert not problems, problems


def test_paraphrase_evidence_spans_each_file(paraphrased, corpus):
    """Questions cover each file's whole length, not its first pages: evidence in every quarter."""
    quarters = {name: Counter() for name in corpus}
    for _, r in paraphrased:
        for ev in r["evidence"]:
            for s in r["source"]:
                pos = corpus[s].find(ev)
                if pos >= 0:
                    quarters[s][min(3, 4 * pos // len(corpus[s]))] += 1
    thin = {name: dict(q) for name, q in quarters.items() if any(q[i] < 3 for i in range(4))}
    assert not thin, f"files with a quarter holding fewer than 3 evidence quotes: {thin}"


# --- the split --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both():
    return {p.name: [r for _, r in _read(p)] for p in (EVAL_FILE, PARAPHRASE_FILE)}


def test_split_is_balanced(both):
    recs = [r for rs in both.values() for r in rs]
    assert all(r["split"] in ("tune", "test") for r in recs)
    share = sum(r["split"] == "test" for r in recs) / len(recs)
    assert 0.37 <= share <= 0.43, share
    groups = {}
    for name, rs in both.items():
        for r in rs:
            for key in (("suite", name), ("lang", r["lang"]), ("type", r["type"]), ("lang+type", r["lang"], r["type"])):
                groups.setdefault(key, []).append(r["split"] == "test")
    off = {k: f"{sum(v)}/{len(v)}" for k, v in groups.items() if len(v) >= 8 and not 0.3 <= sum(v) / len(v) <= 0.5}
    assert not off, f"strata whose test share is outside 0.3-0.5: {off}"


def test_split_is_fixed(both):
    """Re-running the split script on the files as they are changes nothing: the split is assigned once."""
    import copy
    import importlib.util

    spec = importlib.util.spec_from_file_location("evals_split", ROOT / "evals" / "split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    again = copy.deepcopy(both)
    module.assign(again)
    assert again == both
    fresh = {name: [{k: v for k, v in r.items() if k != "split"} for r in rs] for name, rs in both.items()}
    module.assign(fresh)
    assert fresh == both, "the split is not what evals/split.py draws from the ids"
