"""``coldswarm-local``: the whole loop on one machine (what ``make demo`` runs).

Starts a coordinator and N ``join-swarm`` workers as separate processes on
loopback with the embedded default model, then runs one pretrain round (UL2
MoD over hivemind) and fusion rounds (each worker on its own instruction
shard, merged with the configured method), printing a table after each round.
Ctrl-C stops everything; no process is left running.

The processes are started with the same console scripts and flags that
``compose.yaml`` runs in containers (:func:`coordinator_command`,
:func:`worker_command`); a test keeps the two from drifting apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coldswarm.common import cli_args
from coldswarm.common.channel import open_channel
from coldswarm.common.durable import atomic_write_bytes
from coldswarm.coordinator import lineage, publication_gate
from coldswarm.coordinator.states import RoundKind, RoundState, VersionState, WorkerState
from coldswarm.lm.data import TASK_LAYOUTS
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

#: Named recipes: the flags' values each sets (flags given explicitly still win). ``demo`` is the
#: defaults, what ``make demo`` runs in minutes; ``long`` is the recipe that teaches the seen tasks
#: (README, "The long preset": its measured table and time). Full finetuning, averaged, is ColD
#: Fusion's own recipe.
PRESETS: dict[str, dict[str, object]] = {
    "demo": {},
    "long": {
        "pretrain_rounds": 1,
        "pretrain_epochs": 20,
        "fusion_rounds": 8,
        "fusion_shards": "default-mixed",
        "method": "average",
        "peft": "full",
        "fusion_steps": 600,
        "fusion_lr": 3e-4,
        "fusion_batch_size": 32,
        # 600 bf16 steps take about the time of 400 in fp32 on a CPU with AVX512-BF16 or AMX.
        "cpu_bf16": True,
        "round_timeout_s": 2400.0,
        # 48 distinct test questions per task: quick's 12 cannot tell 0.30 from 0.25 (one answer is 0.08).
        "evaluator": "coldswarm.lm.evaluate:evaluate_standard",
    },
}


@dataclass
class LocalClusterConfig:
    """What ``coldswarm-local`` runs; every field is a flag."""

    preset: str = field(
        default="demo",
        metadata={
            "help": "a named recipe that sets the flags below (explicit flags win): demo, the defaults"
            " shown here (minutes); long, a 20-epoch pretrain round, then 8 fusion rounds of 600"
            " full-finetuning steps at lr 3e-4, batch 32, in bf16 where the CPU computes it natively, on"
            " default-mixed shards, merged with average,"
            " scored by evaluate_standard (see the README)",
            "choices": tuple(PRESETS),
        },
    )
    workers: int = field(default=2, metadata={"help": "join-swarm worker processes"})
    run_dir: Path = field(
        default=Path("runs/local"), metadata={"help": "where the coordinator and workers keep state"}
    )
    pretrain_rounds: int = field(default=1, metadata={"help": "UL2 MoD pretrain rounds over hivemind"})
    fusion_rounds: int = field(
        default=2, metadata={"help": "ColD-Fusion rounds (each worker one instruction shard)"}
    )
    method: str = field(default="fisher", metadata={"help": "merge method of fusion rounds"})
    peft: str = field(default="lora", metadata={"help": "lora, ia3 or full"})
    fusion_steps: int = field(default=60, metadata={"help": "finetuning steps per worker per fusion round"})
    fusion_lr: float = field(
        default=0.0, metadata={"help": "fusion learning rate (0: the PEFT method's default)"}
    )
    fusion_batch_size: int = field(default=8, metadata={"help": "examples per fusion step"})
    fusion_shards: str = field(
        default="default",
        metadata={
            "help": "how fusion rounds split the seen tasks among workers: default, each worker its own tasks"
            " (ColD Fusion's setting); default-mixed, each worker a slice of every task",
            "choices": TASK_LAYOUTS,
        },
    )
    cpu_bf16: bool = field(
        default=False,
        metadata={
            "help": "workers finetune in bf16 autocast where the CPU computes bf16 natively (join-swarm"
            " --cpu-bf16; fp32 elsewhere)"
        },
    )
    pretrain_epochs: int = field(default=3, metadata={"help": "swarm optimizer epochs per pretrain round"})
    target_batch_size: int = field(default=32, metadata={"help": "samples per swarm optimizer epoch"})
    pretrain_algorithm: str = field(
        default="sync", metadata={"help": "how pretrain rounds train together: sync or diloco"}
    )
    pretrain_inner_steps: int = field(
        default=8, metadata={"help": "diloco: local steps per worker between syncs (an epoch)"}
    )
    evaluator: str = field(
        default="coldswarm.lm.evaluate:evaluate_version",
        metadata={"help": "module:function the coordinator evaluates each version with ('' for none)"},
    )
    round_timeout_s: float = field(default=900.0, metadata={"help": "give up on a round after this long"})
    fresh: bool = field(default=True, metadata={"help": "start from an empty run dir (--no-fresh resumes)"})
    keep_serving: bool = field(
        default=False, metadata={"help": "keep the coordinator running at the end until Ctrl-C"}
    )
    status_port: int = field(
        default=0, metadata={"help": "port of the status page on 127.0.0.1 (0: a free one; printed at start)"}
    )

    @property
    def coordinator_dir(self) -> Path:
        return self.run_dir / "coordinator"

    @property
    def join_token_file(self) -> Path:
        return self.coordinator_dir / "join.token"

    def fusion_options(self, round_index: int = 0) -> dict:
        """A fusion round's options as the coordinator takes them (statistics follow the merge method).

        ``round_index`` (0 for the first fusion round) seeds the shuffle, so that each round trains on
        the shard in a new order rather than on the same first examples again."""
        return {
            "peft_method": self.peft,
            "shard_prefix": self.fusion_shards,
            "codec": "bytegroup",
            "hyperparameters": {
                "steps": self.fusion_steps,
                "batch_size": self.fusion_batch_size,
                "lr": self.fusion_lr,
                "seed": round_index,
                "max_input_length": 96,
                "eval_examples": 16,
                "fisher_examples": 32,
                "regmean_batches": 4,
            },
        }

    def worker_flags(self, index: int) -> list[str]:
        """The ``join-swarm`` flags of worker ``index`` beyond :func:`worker_command`'s."""
        # Workers train at the same time: more threads than cores make them wait on descheduled siblings
        # (benchmarks/cpu_threads.py: a step 4x slower beside one busy process). Each gets its share.
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        # hivemind peers on loopback only, like everything else of the local cluster
        flags = [f"--name=local-{index}", "--swarm-listen=/ip4/127.0.0.1/tcp/0", f"--cpu-threads={threads}"]
        return flags + (["--cpu-bf16"] if self.cpu_bf16 else [])

    def pretrain_options(self) -> dict:
        """A pretrain round's options: swarm epochs and batch, plus the workers' MoD and hivemind settings."""
        return {
            "epochs": self.pretrain_epochs,
            "target_batch_size": self.target_batch_size,
            "algorithm": self.pretrain_algorithm,
            "hyperparameters": {
                "batch_size": 4,
                "inputs_length": 64,
                "lr": 1e-3,
                "matchmaking_time": 4.0,
                **({"inner_steps": self.pretrain_inner_steps} if self.pretrain_algorithm == "diloco" else {}),
            },
        }


def stop_process_groups(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM each process's group (started with ``start_new_session``), wait up to ``grace_s`` for a
    clean exit, then SIGKILL whatever is left of every group, so no descendant outlives its parent."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    """The console script installed beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: run `make demo` or `pip install -e .` first")
    return found


def coordinator_command(
    data_dir: Path,
    listen: str,
    dht_listen: str,
    join_token_file: Path,
    evaluator: str,
    method: str,
    http_listen: str,
) -> list[str]:
    """The coordinator as coldswarm-local and compose.yaml run it (tests/e2e/test_compose.py compares)."""
    return [
        "coldswarm-coordinator",
        "serve",
        f"--data-dir={data_dir}",
        f"--listen={listen}",
        f"--dht-listen={dht_listen}",
        f"--join-token-file={join_token_file}",
        f"--evaluator={evaluator}",
        f"--default-method={method}",
        f"--http-listen={http_listen}",
    ]


def worker_command(coordinator: str, token_file: Path, work_dir: Path, device: str, extra=()) -> list[str]:
    """A worker as compose.yaml runs it; ``extra``: coldswarm-local's per-process flags (name, loopback)."""
    return [
        "join-swarm",
        f"--coordinator={coordinator}",
        f"--token-file={token_file}",
        f"--work-dir={work_dir}",
        f"--device={device}",
        *extra,
    ]


class LocalCluster:
    def __init__(self, config: LocalClusterConfig):
        self.config = config
        self.procs: list[subprocess.Popen] = []
        self.address = ""
        self.status_url = ""
        self.admin: pb_grpc.AdminServiceStub | None = None
        self.metadata: list[tuple[str, str]] = []
        self.channel: grpc.Channel | None = None

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        argv = [console_script(argv[0]), *argv[1:]]
        log_path = self.config.run_dir / "logs" / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            # Own session: Ctrl-C reaches only this launcher, which then stops children in order.
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        cfg = self.config
        if cfg.fresh and cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        status_port = cfg.status_port or free_port()
        self.status_url = f"http://127.0.0.1:{status_port}/"
        self._spawn(
            coordinator_command(
                cfg.coordinator_dir,
                self.address,
                f"/ip4/127.0.0.1/tcp/{free_port()}",
                cfg.join_token_file,
                cfg.evaluator,
                cfg.method,
                f"127.0.0.1:{status_port}",
            ),
            "coordinator",
        )
        self._wait_for_coordinator()
        print(f"status page: {self.status_url} (lineage, round progress, the swarm's loss curve)", flush=True)
        for i in range(cfg.workers):
            self._spawn(
                worker_command(
                    self.address, cfg.join_token_file, cfg.run_dir / f"worker-{i}", "cpu", cfg.worker_flags(i)
                ),
                f"worker-{i}",
            )
        self._wait_for_workers(cfg.workers)

    def _wait_for_coordinator(self, timeout_s: float = 900.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        token_path = self.config.coordinator_dir / "admin.token"
        self.channel = open_channel(self.address)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        print(f"starting coordinator on {self.address} (building version 0 on first start) ...", flush=True)
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING and token_path.exists():
                    self.metadata = [("authorization", f"Bearer {token_path.read_text().strip()}")]
                    self.admin = pb_grpc.AdminServiceStub(self.channel)
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"the coordinator did not become healthy in {timeout_s:.0f}s; see {self._log('coordinator')}"
        )

    def _wait_for_workers(self, n: int, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            workers = self.admin.ListWorkers(pb.ListWorkersRequest(), metadata=self.metadata).workers
            if len([w for w in workers if w.state != WorkerState.GONE]) >= n:
                print(f"{n} worker(s) registered", flush=True)
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"workers did not register in {timeout_s:.0f}s; see {self.config.run_dir / 'logs'}"
        )

    def _log(self, name: str) -> Path:
        return self.config.run_dir / "logs" / f"{name}.log"

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{Path(proc.args[0]).name} exited with status {proc.returncode}; see {self.config.run_dir / 'logs'}"
                )

    def stop(self) -> None:
        stop_process_groups(list(reversed(self.procs)))  # workers first, so they can say goodbye
        if self.channel is not None:
            self.channel.close()

    # -- rounds -------------------------------------------------------------------------------

    def run_round(self, kind: str, index: int = 0) -> pb.Version:
        """Open round ``index`` of its kind (0 for the first) and wait for its version."""
        cfg = self.config
        options = cfg.fusion_options(index) if kind == RoundKind.FUSION else cfg.pretrain_options()
        request = pb.OpenRoundRequest(
            kind=kind,
            quorum=cfg.workers,
            deadline_s=cfg.round_timeout_s,
            method=cfg.method if kind == RoundKind.FUSION else "",
            options_json=json.dumps(options),
        )
        opened = self.admin.OpenRound(request, metadata=self.metadata)
        print(f"round {opened.id} ({kind}) open on version {opened.base_version} ...", flush=True)
        return self.wait_round(opened.id)

    def wait_round(self, round_id: int) -> pb.Version:
        """Wait until round ``round_id`` has a result (published, or held back by the publication gate:
        rejected); returns its version. Fails if the round failed or was cancelled."""
        deadline = time.monotonic() + self.config.round_timeout_s + 60
        while time.monotonic() < deadline:
            self._check_alive()
            rounds = self.admin.ListRounds(pb.ListRoundsRequest(), metadata=self.metadata).rounds
            current = next(r for r in rounds if r.id == round_id)
            # Published, or held back by the publication gate (rejected): either way the round's version.
            done = current.state in (RoundState.PUBLISHED, RoundState.REJECTED, RoundState.MERGED)
            if done and current.HasField("result_version"):
                return self.admin.GetVersion(
                    pb.GetVersionRequest(version=str(current.result_version)), metadata=self.metadata
                )
            if current.state in (RoundState.FAILED, RoundState.CANCELLED):
                raise RuntimeError(f"round {current.id} {current.state}: {current.error}")
            time.sleep(1.0)
        raise TimeoutError(f"round {round_id} did not finish in {self.config.round_timeout_s:.0f}s")

    def admin_cli(self, *args: str, timeout: float = 120) -> str:
        """Run ``coldswarm-admin ARGS`` against this cluster's coordinator, as a user would; returns stdout."""
        command = [
            console_script("coldswarm-admin"),
            f"--coordinator={self.address}",
            f"--token-file={self.config.coordinator_dir.resolve() / 'admin.token'}",
            *args,
        ]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout).stdout

    def download(self, ref: str, out: Path) -> list[str]:
        """Download version ``ref`` into ``out`` with the admin CLI, as a user would; returns the command."""
        command = [
            "coldswarm-admin",
            f"--coordinator={self.address}",
            f"--token-file={self.config.coordinator_dir.resolve() / 'admin.token'}",
            "download",
            ref,
            "--out",
            str(out),
        ]
        subprocess.run([console_script(command[0]), *command[1:]], check=True, timeout=600)
        return command

    def versions_dir(self) -> Path:
        """Where the coordinator keeps each version as an HF directory (``<dir>/<number>``)."""
        return self.config.coordinator_dir / "versions"

    def version(self, ref: str) -> pb.Version:
        return self.admin.GetVersion(pb.GetVersionRequest(version=ref), metadata=self.metadata)

    def write_versions_json(self) -> Path:
        """``<run dir>/versions.json``: the lineage as data (the document ``coldswarm-admin --json versions``
        prints), written atomically; returns its path."""
        listing = self.admin.ListVersions(pb.ListVersionsRequest(), metadata=self.metadata)
        path = self.config.run_dir / "versions.json"
        text = json.dumps(lineage.document(listing.versions), indent=2) + "\n"
        atomic_write_bytes(path, text.encode(), mode=0o644)
        return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summarise(version: pb.Version) -> dict:
    """One table row from a version's manifest."""
    manifest = json.loads(version.manifest_json or "{}")
    metrics = manifest.get("metrics", {})
    mod = metrics.get("mod_loss")
    mod_mean = sum(mod.values()) / len(mod) if isinstance(mod, dict) and mod else mod
    return {
        "version": version.number,
        "parent": version.parent if version.HasField("parent") else None,
        "state": version.state,
        "round": manifest.get("kind", version.method),
        "method": version.method,
        # A pretrain version's contributors are the admitted workers whose signed records the checkpointer read.
        "contributions": len(manifest.get("contributions", []) or manifest.get("swarm_participants", [])),
        "mod_loss": mod_mean,
        "seen_loss": metrics.get("seen_token_loss"),
        "seen_em": metrics.get("seen_exact_match"),
        "heldout_em": metrics.get("heldout_exact_match"),
        "gate": publication_gate.summary(manifest.get("gate")),
    }


def print_table(rows: list[dict]) -> None:
    headers = [
        "version",
        "parent",
        "state",
        "round",
        "method",
        "contributions",
        "mod_loss",
        "seen_loss",
        "seen_em",
        "heldout_em",
        "gate",
    ]
    cells = [[_fmt(r.get(h)) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coldswarm-local",
        description="Run a coordinator and N workers on this machine through pretrain and fusion rounds.",
    )
    cli_args.add_arguments(p, LocalClusterConfig)
    return p


def parse_config(argv: list[str] | None = None) -> LocalClusterConfig:
    """The flags as a config: the ``--preset``'s values first, then every flag given explicitly."""
    parser = build_parser()
    preset = parser.parse_args(argv).preset
    parser.set_defaults(**PRESETS[preset])
    return LocalClusterConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    cluster = LocalCluster(config)

    def terminate(signum, _frame):
        raise KeyboardInterrupt  # SIGTERM stops the cluster exactly as Ctrl-C does

    signal.signal(signal.SIGTERM, terminate)
    rows: list[dict] = []
    try:
        cluster.start()
        rows.append(summarise(cluster.version("latest")))
        print_table(rows)
        cluster.write_versions_json()
        plan = [(RoundKind.PRETRAIN, i) for i in range(config.pretrain_rounds)]
        plan += [(RoundKind.FUSION, i) for i in range(config.fusion_rounds)]
        for kind, index in plan:
            rows.append(summarise(cluster.run_round(kind, index)))
            print()
            print_table(rows)
            cluster.write_versions_json()
        held = [r["version"] for r in rows if r["state"] == VersionState.REJECTED]
        if held:
            print(f"held back by the publication gate (worse than their parent): versions {held}")
        print(f"the lineage as data: {config.run_dir / 'versions.json'}")
        latest = cluster.version("latest")
        out = (config.run_dir / f"coldswarm-v{latest.number}").resolve()
        command = cluster.download("latest", out)
        print(f"\nlatest version: {latest.number}, downloaded to {out}")
        print("  (a Hugging Face directory: AutoModelForSeq2SeqLM.from_pretrained / AutoTokenizer load it)")
        print("the command that downloads it while this coordinator serves (--keep-serving keeps it up):")
        print("  " + " ".join(command))
        if config.keep_serving:
            print(
                f"\ncoordinator serving on {cluster.address}, status page {cluster.status_url}; Ctrl-C to stop"
            )
            while True:
                cluster._check_alive()
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the cluster", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, FileNotFoundError, grpc.RpcError) as exc:
        print(f"coldswarm-local: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
