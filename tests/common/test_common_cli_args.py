"""Typed config dataclasses become argparse flags with the help of their fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coldswarm.common import cli_args
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.local_cluster import build_parser as local_parser
from coldswarm.worker.cli import build_parser as worker_parser
from coldswarm.worker.config import WorkerConfig


@dataclass
class Example:
    name: str = field(metadata={"help": "required, no default"})
    count: int = field(default=3, metadata={"help": "how many"})
    out: Path | None = field(default=None, metadata={"help": "where", "metavar": "DIR", "flag": "--to"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    strict: bool = field(default=False, metadata={"help": "be strict", "action": "store_true"})
    peers: list[str] = field(default_factory=list, metadata={"help": "peers"})
    listen: list[str] = field(default_factory=list, metadata={"help": "repeat", "action": "append"})
    mode: str = field(default="a", metadata={"help": "mode", "choices": ["a", "b"]})
    knob: float = field(default=0.5, metadata={"help": "testing only", "hidden": True})
    token: str = field(default="", metadata={"help": "from env", "env": "CLI_ARGS_TEST_TOKEN"})


def parser(monkeypatch) -> argparse.ArgumentParser:
    monkeypatch.setenv("CLI_ARGS_TEST_TOKEN", "from-env")
    p = argparse.ArgumentParser(prog="example")
    cli_args.add_arguments(p, Example)
    return p


def test_flags_types_and_defaults_come_from_the_fields(monkeypatch):
    p = parser(monkeypatch)
    args = p.parse_args(["--name", "n", "--to", "/tmp/x", "--no-fast", "--strict", "--peers", "a", "b"]
                        + ["--listen", "x", "--listen", "y", "--count", "7", "--knob", "2"])  # fmt: skip
    config = cli_args.from_args(Example, args)
    assert config == Example(
        name="n", count=7, out=Path("/tmp/x"), fast=False, strict=True, peers=["a", "b"],
        listen=["x", "y"], mode="a", knob=2.0, token="from-env",
    )  # fmt: skip
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required: its field has no default
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "n", "--mode", "c"])


def test_help_shows_each_fields_text_and_hides_testing_knobs(monkeypatch):
    text = parser(monkeypatch).format_help()
    assert "how many (default: 3)" in text and "--to DIR" in text and "--fast, --no-fast" in text
    assert "--knob" not in text and "testing only" not in text
    quiet = argparse.ArgumentParser()
    cli_args.add_arguments(quiet, Example, show_defaults=False)
    assert "how many (default: 3)" not in quiet.format_help()


def test_the_three_console_scripts_have_a_flag_per_field():
    """join-swarm, coldswarm-local and coldswarm-coordinator serve build their flags from their configs."""
    worker = {a.dest for a in worker_parser()._actions} - {"help"}
    assert worker == {f for f in WorkerConfig.__dataclass_fields__}
    serve = argparse.ArgumentParser()
    from coldswarm.coordinator.config import add_arguments

    add_arguments(serve)
    assert {a.dest for a in serve._actions} - {"help"} == set(CoordinatorConfig.__dataclass_fields__)
    assert {"workers", "fusion_steps", "keep_serving"} <= {a.dest for a in local_parser()._actions}
