"""Loaders on good and malformed files, shard specs, and the default tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coldswarm.lm.data import (
    DataError,
    LoadReport,
    default_task_groups,
    iter_corpus_file,
    iter_instruction_file,
    resolve_shard,
)
from coldswarm.lm.evaluate import question_of
from coldswarm.lm.tasks import HELDOUT_TASKS, SEEN_TASKS, TASKS, TaskConfig, generate_split, instance_split

KEYS = {"inputs", "targets", "task_name", "template_type"}


def _write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = {
    "flan": [{"inputs": "2+2?", "targets": "4"}, {"inputs": "a", "targets": "b", "task_name": "t"}],
    "alpaca": [
        {"instruction": "Add.", "input": "2 2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say yo.", "output": "yo"},
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye"},
            ]
        }
    ],
    "chat": [{"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}],
}


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_instruction_formats_good(tmp_path, fmt):
    recs = list(iter_instruction_file(_write_jsonl(tmp_path / f"{fmt}.jsonl", GOOD[fmt]), on_error="raise"))
    assert all(set(r) == KEYS for r in recs)
    if fmt == "alpaca":
        assert [r["inputs"] for r in recs] == ["Add.\n\n2 2", "Say hi.", "Say yo."]
    if fmt == "sharegpt":
        assert [r["targets"] for r in recs] == ["Hello", "Goodbye"]
        assert recs[0]["inputs"] == "System: Be brief.\nUser: Hi"
        assert recs[1]["inputs"].endswith("Assistant: Hello\nUser: Bye")
    if fmt == "chat":
        assert recs == [{"inputs": "2+3?", "targets": "5", "task_name": "chat", "template_type": "chat"}]
    if fmt == "flan":
        assert recs[1]["task_name"] == "t" and recs[0]["task_name"] == "flan"


BAD = [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"foo": 1}),
    json.dumps({"inputs": "x", "targets": ""}),
    json.dumps({"conversations": [{"from": "gpt", "value": "orphan"}]}),
    json.dumps({"messages": [{"role": "alien", "content": "?"}]}),
    json.dumps({"instruction": 3, "output": "x"}),
]


def test_malformed_lines_reported_with_line_numbers(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [GOOD["flan"][0], *BAD, GOOD["chat"][0]])
    report = LoadReport()
    recs = list(iter_instruction_file(path, on_error="skip", report=report))
    assert len(recs) == 2 and report.records == 2
    assert len(report.errors) == len(BAD)
    assert [e.split(":")[1] for e in report.errors] == [str(n) for n in range(2, 2 + len(BAD))]
    assert all(e.startswith(str(path)) for e in report.errors)
    assert len([r for r in caplog.records if "mixed.jsonl" in r.getMessage()]) == len(BAD)  # never silent
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid JSON"):
        list(iter_instruction_file(path, on_error="raise"))


def test_corpus_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    _write_jsonl(
        tmp_path / "b.jsonl", [{"text": "json doc"}, "{broken", {"txt": "wrong key"}, {"text": "last"}]
    )
    pq.write_table(pa.table({"text": ["p0", "p1", None], "id": [0, 1, 2]}), tmp_path / "c.parquet")
    assert list(iter_corpus_file(tmp_path / "a.txt")) == ["first doc still first", "second doc"]
    report = LoadReport()
    assert list(iter_corpus_file(tmp_path / "b.jsonl", report=report)) == ["json doc", "last"]
    assert [e.split(":")[1] for e in report.errors] == ["2", "3"]
    report = LoadReport()
    assert list(iter_corpus_file(tmp_path / "c.parquet", report=report)) == ["p0", "p1"]
    assert "row 3" in report.errors[0]
    with pytest.raises(DataError, match="b.jsonl:2"):
        list(iter_corpus_file(tmp_path / "b.jsonl", on_error="raise"))


def test_parquet_instructions(tmp_path):
    pq.write_table(pa.table({"inputs": ["q1", "q2"], "targets": ["a1", ""]}), tmp_path / "i.parquet")
    report = LoadReport()
    recs = list(iter_instruction_file(tmp_path / "i.parquet", report=report))
    assert [r["targets"] for r in recs] == ["a1"] and "row 2: empty target" in report.errors[0]


def test_local_and_corpus_shards(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "flan.jsonl", [{"inputs": f"q{i}", "targets": f"a{i}"} for i in range(400)])
    _write_jsonl(data / "text.jsonl", [{"text": f"doc {i}"} for i in range(6)])
    (data / "notes.txt").write_text("t0\n\nt1\n")
    splits = {
        s: [r["inputs"] for r in resolve_shard("local", data, split=s)]
        for s in ("train", "validation", "test")
    }
    # Every record in exactly one split, in file order; validation and test ~10% each, never empty here.
    assert sorted(sum(splits.values(), []), key=lambda q: int(q[1:])) == [f"q{i}" for i in range(400)]
    assert all(20 <= len(splits[s]) <= 60 for s in ("validation", "test"))
    whole = splits["train"]
    assert resolve_shard("local", data).shuffle_buffer <= 10000
    parts = [[r["inputs"] for r in resolve_shard(f"local:{i}-of-3", data)] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole) and parts[1] == whole[1::3]
    # The split is a property of the record: another file order or more data does not move it.
    _write_jsonl(data / "a-more.jsonl", [{"inputs": f"z{i}", "targets": "b"} for i in range(50)])
    grown = [r["inputs"] for r in resolve_shard("local", data, split="validation")]
    assert [q for q in grown if q.startswith("q")] == splits["validation"]
    with pytest.raises(ValueError, match="unknown split"):
        resolve_shard("local", data, split="dev")
    docs = [list(resolve_shard(f"corpus:{i}-of-2", data)) for i in range(2)]
    assert sorted(docs[0] + docs[1]) == sorted(["t0", "t1"] + [f"doc {i}" for i in range(6)])
    default = resolve_shard("corpus:0-of-1000")
    assert default.kind == "corpus" and len(list(default)) == 6
    with pytest.raises(ValueError):
        resolve_shard("local", None)
    with pytest.raises(ValueError):
        resolve_shard("corpus:3-of-3")
    with pytest.raises(ValueError):
        resolve_shard("nonsense:1")


def test_default_shards_partition_seen_tasks(lm_cache):
    for n in (1, 3, len(SEEN_TASKS), 15):
        groups = default_task_groups(n)
        names = sorted({t for g in groups for t, _, _ in g})
        assert names == sorted(SEEN_TASKS) and all(groups)
        assert not set(HELDOUT_TASKS) & set(names)
    counts = [len(list(resolve_shard(f"default:{i}-of-15", cache_dir=lm_cache))) for i in range(15)]
    assert sum(counts) == len(SEEN_TASKS) * TaskConfig().train_per_task
    # In memory already: a seeded pass shuffles the whole shard, where a local one streams a window.
    assert resolve_shard("default:0-of-1", cache_dir=lm_cache).shuffle_buffer >= sum(counts)
    shard = resolve_shard("default:task=add,uppercase", cache_dir=lm_cache)
    assert {r["task_name"] for r in shard} == {"add", "uppercase"}
    with pytest.raises(ValueError, match="held out"):
        resolve_shard(f"default:task={HELDOUT_TASKS[0]}")
    assert len(
        list(resolve_shard(f"default:task={HELDOUT_TASKS[0]}", cache_dir=lm_cache, allow_heldout=True))
    )


def test_mixed_shards_partition_the_train_split_and_each_holds_every_seen_task(lm_cache):
    slices = [list(resolve_shard(f"default-mixed:{i}-of-3", cache_dir=lm_cache)) for i in range(3)]
    whole = list(resolve_shard("default:0-of-1", cache_dir=lm_cache))
    for part in slices:
        assert {r["task_name"] for r in part} == set(SEEN_TASKS)
    key = [json.dumps(r, sort_keys=True) for r in whole]
    parts = [json.dumps(r, sort_keys=True) for part in slices for r in part]
    # The slices partition the train split (as a multiset: the generator may draw an instance twice).
    assert sorted(parts) == sorted(key)
    test_part = list(resolve_shard("default-mixed:0-of-3", split="test", cache_dir=lm_cache))
    assert not {r["task_name"] for r in test_part} & set(HELDOUT_TASKS)
    for bad in ("default-mixed:3-of-3", "default-mixed:task=add", "default-mixed:"):
        with pytest.raises(ValueError):
            resolve_shard(bad)


def test_tasks_are_flan_style_and_split_cleanly():
    assert len(TASKS) >= 10 and len(HELDOUT_TASKS) >= 3
    cfg = TaskConfig(train_per_task=200, validation_per_task=20, test_per_task=40)
    for name, task in TASKS.items():
        assert len(task.templates) >= 3
        recs = {s: list(generate_split(name, s, cfg)) for s in ("train", "validation", "test")}
        kinds = {r["template_type"] for r in recs["train"]}
        assert {k.split("_")[0] for k in kinds} == {"zs", "fs"}
        for r in recs["test"]:
            assert set(r) == KEYS and r["task_name"] == name
            assert r["targets"].strip() and r["targets"] != r["inputs"].split("\n\n")[-1]
        # Deterministic.
        assert recs["test"] == list(generate_split(name, "test", cfg))
        # No test query appears as a training query.
        queries = {s: {r["inputs"].split("\n\n")[-1] for r in recs[s]} for s in recs}
        assert not queries["test"] & queries["train"]
    assert instance_split("add", {"a": 1, "b": 2, "answer": "3"}) in ("train", "validation", "test")


#: The README's `generate` example: what a person asks first, by the task that should answer it.
README_PROMPTS = {
    "reverse_words": "Reverse the words: red blue green",
    "add": "What is 3 plus 4?",
    "uppercase": "Uppercase: hello world",
}


@pytest.mark.parametrize("task_name", sorted(README_PROMPTS))
def test_the_readme_prompts_are_phrasings_a_template_of_their_task_covers(task_name):
    prompt = README_PROMPTS[task_name]
    assert prompt in (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    # A whole-prompt match of a template, its fields filled by anything: not just its first words.
    patterns = [
        re.escape(inp).replace(r"\{", "{").replace(r"\}", "}") for inp, _ in TASKS[task_name].templates
    ]
    patterns = [re.sub(r"\{\w+\}", ".+", p) for p in patterns]
    assert any(re.fullmatch(p, prompt) for p in patterns), patterns


def test_the_reverse_add_and_uppercase_tasks_draw_what_the_readme_asks():
    train = TaskConfig(train_per_task=400, validation_per_task=0, test_per_task=0)
    queries = [r["inputs"].split("\n\n")[-1] for r in generate_split("reverse_words", "train", train)]
    words = {w for q in queries for w in q.split(": ")[-1].split("\n")[0].split()}
    assert {"red", "blue", "green"} <= words
    sums = [r for r in generate_split("add", "train", train) if r["template_type"].startswith("zs")]
    one_digit = [r for r in sums if all(len(n) == 1 for n in _numbers(r))]
    assert 0.3 < len(one_digit) / len(sums) < 0.7
    upper = [r for r in generate_split("uppercase", "train", train) if r["template_type"].startswith("zs")]
    assert {"HELLO", "WORLD"} <= {w for r in upper for w in r["targets"].split()}


def _numbers(record):
    return [t.strip("?.=") for t in record["inputs"].split() if t.strip("?.=").isdigit()]


def test_the_held_out_tasks_compose_what_seen_tasks_teach():
    from coldswarm.lm.lexicon import load_lexicon, number_to_words

    plurals = load_lexicon()["nouns"]
    cfg = TaskConfig(train_per_task=0, validation_per_task=0, test_per_task=60)
    for r in generate_split("sum_in_words", "test", cfg):
        a, b = map(int, re.findall(r"\d+", question_of(r)))
        assert r["targets"] == number_to_words(a + b)  # add, then spell_number
    for r in generate_split("plural_list", "test", cfg):
        words = question_of(r).split(": ")[-1].split("\n")[0].split()
        assert 2 <= len(words) <= 3 and r["targets"] == " ".join(plurals[w] for w in words)
    # Big enough to score 48 distinct questions each, and none is a yes/no that chance answers half the time.
    for name in HELDOUT_TASKS:
        records = list(generate_split(name, "test", TaskConfig()))
        assert len({question_of(r) for r in records}) >= 48
        assert len({r["targets"] for r in records}) > 10
