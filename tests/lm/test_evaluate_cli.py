"""Evaluation returns the manifest keys; the coldswarm-model CLI works end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from coldswarm.lm.cli import main
from coldswarm.lm.evaluate import (
    EvalConfig,
    distinct_questions,
    evaluate_version,
    format_table,
    protocol,
    question_of,
)
from coldswarm.lm.tasks import load_task_split

SMALL = EvalConfig(
    mod_examples_per_denoiser=2,
    seen_tasks=("add", "antonym"),
    seen_examples_per_task=4,
    heldout_finetune_steps=2,
    heldout_batch_size=4,
    heldout_examples_per_task=4,
)


def test_evaluate_version_keys(version_dir, lm_cache):
    m = evaluate_version(version_dir, SMALL, cache_dir=lm_cache)
    assert set(m["mod_loss"]) == {"R", "X", "S"}
    assert len(m["mod_loss_by_denoiser"]) == 7
    assert all(math.isfinite(v) and v > 0 for v in m["mod_loss"].values())
    assert set(m["seen"]) == {"add", "antonym"}
    assert set(m["heldout"]) == set(SMALL.heldout_tasks)
    assert {m["seen"][t]["questions"] for t in m["seen"]} == {4}
    assert m["protocol"] == protocol(SMALL) != protocol(EvalConfig.standard())
    for key in ("seen_exact_match", "seen_token_loss", "heldout_exact_match", "heldout_exact_match_before"):
        assert math.isfinite(m[key])
    json.dumps(m)  # goes into the manifest as is
    assert "held-out task" in format_table(m)


def test_cli_smoke(tmp_path, lm_cache, capsys, version_dir):
    base = ["--cache-dir", str(lm_cache)]
    assert main([*base, "build-tokenizer"]) == 0
    assert main([*base, "collate", "--n", "2", "--inputs-length", "48", "--denoiser", "X-3-0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and "[NLG]" in out and "<extra_id_0>" in out
    assert main([*base, "shard", "default:0-of-2", "--n", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# instructions") and json.loads(lines[1])["targets"]
    assert main([*base, "shard", "default:task=max_number"]) == 1  # held out: refused, non-zero exit
    assert main([*base, "build-default", "--out", str(version_dir)]) == 1  # exists


def test_cli_shard_reports_or_refuses_malformed_records(tmp_path, lm_cache, capsys):
    data = tmp_path / "data"
    data.mkdir()
    good = [json.dumps({"instruction": f"say {i}", "input": "", "output": f"{i}"}) for i in range(40)]
    (data / "mine.jsonl").write_text("\n".join([*good[:3], "{not json", *good[3:]]) + "\n")
    base = ["--cache-dir", str(lm_cache), "shard", "local", "--data", str(data), "--n", "100"]
    assert main(base) == 0
    captured = capsys.readouterr()
    assert "mine.jsonl:4" in captured.err and len(captured.out.strip().splitlines()) > 30
    assert main([*base, "--strict"]) == 1
    assert "mine.jsonl:4" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_console_script_builds_version(tmp_path, lm_cache):
    out = tmp_path / "v0"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "coldswarm.lm.cli",
            "--cache-dir",
            str(lm_cache),
            "build-default",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "spiece.model").exists()


def test_the_standard_preset_is_quick_with_48_test_examples_per_task():
    counts = {"seen_examples_per_task": 48, "heldout_examples_per_task": 48}
    assert EvalConfig.standard() == dataclasses.replace(EvalConfig.quick(), **counts)


def test_a_task_is_scored_on_distinct_questions(lm_cache):
    # past_tense's test split asks a few verbs, each zero-shot or after other exemplars.
    records = load_task_split("past_tense", "test", cache_dir=lm_cache)
    questions = {question_of(r) for r in records}
    assert len(questions) < 12 and len({r["inputs"] for r in records}) > len(questions)
    picked = distinct_questions(records, 48)
    assert {question_of(r) for r in picked} == questions and len(picked) == len(questions)
    assert picked[0] == records[0] and all(r in records for r in picked)
    assert distinct_questions(records, 3) == picked[:3] and distinct_questions(records, 0) == []
    shot = {"inputs": "Past tense: go\nwent\n\nWhat is the past tense of see?", "targets": "saw"}
    assert question_of(shot) == "What is the past tense of see?"
    assert question_of({"inputs": "red blue\nReversed:"}) == "red blue\nReversed:"
