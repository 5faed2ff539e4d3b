"""Does fusion help? The two claims coldswarm is built on, measured from a pretrained base.

Seeded, repeated over ``--seeds``, printing mean ± sd. Everything runs with the
real pieces: the base is pretrained by the project's own pretrain path
(``coldswarm-local --fusion-rounds 0``: a coordinator, two ``join-swarm`` workers
and a UL2 MoD round over hivemind), or read from ``--base`` (a downloaded
version); contributions are made by the worker's own fusion job
(:func:`coldswarm.worker.fusion_job.run_fusion_job`: finetune, Fisher + Gram
statistics, safetensors payload) and merged by the coordinator's merge driver
(:func:`coldswarm.fusion.merge.merge_checkpoints`).

1. **Merging (Matena & Raffel 2021; Jin et al. 2022; Yadav et al. 2023; Ilharco
   et al. 2023).** ``--contributors`` contributions finetuned from the same base on
   different seen-task groups (``default:i-of-N``) are merged with ``average``,
   ``fisher``, ``regmean``, ``ties`` and ``task_arithmetic`` (scalings
   ``--ta-scalings``); each merged model's mean exact match and token loss over the
   groups' tasks are printed next to each contributor alone and to a *multitask*
   model, one finetune on the pooled data (``default:0-of-1``) with the same total
   steps as all the contributors together (the paper's upper bound).
2. **ColD Fusion (Don-Yehiya et al. 2023).** From the pretrained base, each round
   ``--contributors`` contributors finetune the current base on their groups and
   the merge (``--cold-method``, ``average`` as in the paper) becomes the next
   base. After 0 to ``--rounds`` rounds, the held-out tasks' exact match after the
   short, fixed, seeded finetune of :mod:`coldswarm.lm.evaluate` measures whether
   the base became a better starting point; the untrained version 0 and the
   multitask model are scored the same way as references.

The base is pretrained once and shared by all seeds (a hivemind round is not
bit-reproducible anyway); the seeds vary every finetune, the held-out finetune
and the order of the data.

    python benchmarks/fusion_quality.py                     # the README's figures
    python benchmarks/fusion_quality.py --base runs/local/coldswarm-v1   # from a version you have
    python benchmarks/fusion_quality.py --quick             # a smoke run (minutes)

Nothing here is asserted; it prints what comes out, including where a claim
does not reproduce at this scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from coldswarm.common.signals import install_stop_handler
from coldswarm.fusion.merge import merge_checkpoints
from coldswarm.lm.default import build_default_version
from coldswarm.lm.evaluate import EvalConfig, distinct_questions, evaluate_model, score_records
from coldswarm.lm.model import load_model
from coldswarm.lm.tasks import SEEN_TASKS, load_task_split
from coldswarm.lm.tokenizer import load_tokenizer
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.fusion_job import run_fusion_job
from coldswarm.worker.jobs import JobContext
from coldswarm.worker.progress import Progress

#: (row label, merge method, its options); task_arithmetic's rows are added per ``--ta-scalings``.
MERGE_METHODS: list[tuple[str, str, dict]] = [
    ("average", "average", {}),
    ("fisher", "fisher", {}),
    ("regmean", "regmean", {}),
    ("ties", "ties", {}),
]
#: The shard of the whole seen-task pool: one group of every task.
POOLED_SHARD = "default:0-of-1"
#: How long a stopped benchmark waits for its ``coldswarm-local`` to stop its own children.
CHILD_STOP_TIMEOUT_S = 60.0


def pretrain_base(work: Path, epochs: int) -> Path:
    """A base pretrained by the project's own path: ``coldswarm-local`` with pretrain rounds only (its
    coordinator, two join-swarm workers, MoD over hivemind), gated and downloaded as a user gets it."""
    run_dir = work / "pretrain-run"
    cli = Path(sys.executable).parent / "coldswarm-local"
    cmd = [str(cli), "--run-dir", str(run_dir), "--fusion-rounds", "0", "--pretrain-epochs", str(epochs)]
    print(f"pretraining the base: {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate()
    finally:
        # Stopped here (Ctrl-C, SIGTERM): SIGTERM lets coldswarm-local stop its coordinator and workers;
        # subprocess.run's SIGKILL would orphan them.
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=CHILD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
    if child.returncode != 0:
        sys.exit(f"coldswarm-local failed ({child.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    print(stdout.strip().split("\n\nlatest version")[0], flush=True)
    versions = sorted(run_dir.glob("coldswarm-v*"), key=lambda p: int(p.name.rsplit("v", 1)[1]))
    if not versions or versions[-1].name == "coldswarm-v0":
        sys.exit("coldswarm-local published no pretrained version (its gate held the round back?)")
    base = work / "base"
    shutil.copytree(versions[-1], base)
    print(f"base: {versions[-1].name}, pretrained in {time.monotonic() - started:.0f}s", flush=True)
    return base


def contribute(base_dir: Path, work: Path, shard: str, hp: dict, seed: int, tag: str) -> Path:
    """One worker's contribution, made exactly as join-swarm makes it."""
    task = pb.FusionTask(
        shard=shard,
        peft_method=hp["peft_method"],
        hyperparameters_json=json.dumps({k: v for k, v in hp.items() if k != "peft_method"} | {"seed": seed}),
        statistics=["fisher", "regmean"],
        codec="none",
    )
    scratch = work / f"scratch-{tag}"
    scratch.mkdir(parents=True)
    assignment = pb.Assignment(id=tag, round_id=1, base_version=0, fusion=task)
    ctx = JobContext(assignment, base_dir, scratch, None, "cpu", Progress(), threading.Event())
    return run_fusion_job(ctx, task).payload


def merge(base_dir: Path, contributions: list[Path], method: str, options: dict, out: Path) -> Path:
    merge_checkpoints(base_dir, contributions, method, options, out)
    return out


def group_tasks(n: int) -> list[list[str]]:
    from coldswarm.lm.data import default_task_groups

    return [sorted({t for t, _, _ in g}) for g in default_task_groups(n)]


def scores(model_dir: Path, tasks: list[str], n: int) -> tuple[float, float]:
    """Mean exact match and mean token loss over ``tasks`` (``n`` distinct test questions each)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    config = EvalConfig(batch_size=32)
    # The evaluator's own choice of records: n distinct questions (a lexicon task's first n repeat some).
    per_task = [
        score_records(model, tok, distinct_questions(load_task_split(t, "test"), n), config) for t in tasks
    ]
    em = sum(s["exact_match"] for s in per_task) / len(per_task)
    return em, sum(s["token_loss"] for s in per_task) / len(per_task)


def heldout_after_finetune(model_dir: Path, config: EvalConfig) -> tuple[float, float]:
    """Held-out exact match and token loss after the short finetune (means over the tasks)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    heldout = evaluate_model(model, tok, config)["heldout"].values()
    return (
        statistics.mean(s["exact_match"] for s in heldout),
        statistics.mean(s["token_loss"] for s in heldout),
    )


def mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def hyperparameters(args, steps: int) -> dict:
    # The workers' own validation scoring is not needed here: the benchmark scores every model itself.
    hp = {
        "peft_method": args.peft,
        "steps": steps,
        "batch_size": args.batch_size,
        "eval_examples": 0,
        "fisher_examples": args.fisher_examples,
    }
    if args.lr:
        hp["lr"] = args.lr
    return hp


def merge_methods(args) -> list[tuple[str, str, dict]]:
    scaled = [(f"task_arithmetic x{s:g}", "task_arithmetic", {"scaling": s}) for s in args.ta_scalings]
    return MERGE_METHODS + scaled


def multitask_model(args, seed: int, base: Path, work: Path) -> Path:
    """One finetune on the pooled seen tasks with the contributors' total steps (merged alone = itself)."""
    hp = hyperparameters(args, args.steps * args.contributors)
    payload = contribute(base, work, POOLED_SHARD, hp, seed, "multitask")
    return merge(base, [payload], "average", {}, work / "multitask")


def run_merging(args, seed: int, base: Path, work: Path, groups: list[list[str]], multitask: Path) -> dict:
    hp = hyperparameters(args, args.steps)
    tasks = sorted({t for g in groups for t in g})
    n = len(groups)
    contribs = [contribute(base, work, f"default:{i}-of-{n}", hp, seed, f"m{i}") for i in range(n)]
    row: dict[str, float] = {}

    def score(key: str, model_dir: Path, which: list[str]) -> None:
        row[f"{key}: EM"], row[f"{key}: token loss"] = scores(model_dir, which, args.examples)

    score("base", base, tasks)
    for i, c in enumerate(contribs):
        own = merge(base, [c], "average", {}, work / f"own-{i}")
        score(f"contributor {i}, all tasks", own, tasks)
        score(f"contributor {i}, own group", own, groups[i])
    for label, method, options in merge_methods(args):
        score(f"merged {label}", merge(base, contribs, method, options, work / f"merged-{label}"), tasks)
    score(f"multitask ({args.steps * n} steps)", multitask, tasks)
    return row


def run_cold_fusion(args, seed: int, base: Path, v0: Path, work: Path, multitask: Path) -> dict:
    n = args.contributors
    hp = hyperparameters(args, args.cold_steps)
    config = EvalConfig(
        mod_examples_per_denoiser=1,
        seen_tasks=(SEEN_TASKS[0],),
        seen_examples_per_task=1,
        heldout_finetune_steps=args.heldout_steps,
        heldout_examples_per_task=args.examples,
        seed=seed,
    )
    row: dict[str, float] = {}

    def score(key: str, model_dir: Path) -> None:
        row[f"{key}: EM"], row[f"{key}: token loss"] = heldout_after_finetune(model_dir, config)

    score("version 0 (not pretrained)", v0)
    score("round 0 (the pretrained base)", base)
    current = base
    for r in range(1, args.rounds + 1):
        contribs = [
            contribute(current, work, f"default:{i}-of-{n}", hp, seed + 100 * r, f"c{r}-{i}")
            for i in range(n)
        ]
        current = merge(current, contribs, args.cold_method, {}, work / f"cold-{r}")
        score(f"round {r}", current)
    score(f"multitask ({args.steps * n} steps)", multitask)
    return row


def report(args, groups, merging_rows, cold_rows) -> None:
    print(f"\nsettings: {vars(args)}")
    print(f"task groups: {groups}")
    for title, rows in (
        (f"1. merging {args.contributors} contributions: mean over their tasks", merging_rows),
        ("2. ColD Fusion: held-out tasks after the short finetune", cold_rows),
    ):
        if not rows:
            continue
        print(f"\n{title} (mean ± sd over {len(rows)} seed(s))")
        for key in rows[0]:
            print(f"  {key:48s} {mean_sd([r[key] for r in rows])}")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base", type=Path, default=None, help="a pretrained version dir (default: pretrain one)")
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=20,
        help="swarm epochs of the base's pretrain round (no --base)",
    )
    p.add_argument("--contributors", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peft", default="full", choices=["lora", "ia3", "full"])
    p.add_argument("--steps", type=int, default=300, help="finetuning steps per contribution (merging)")
    p.add_argument(
        "--cold-steps", type=int, default=60, help="finetuning steps per contribution (ColD rounds)"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="0: the worker's default for the PEFT method")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fisher-examples", type=int, default=32)
    p.add_argument(
        "--examples", type=int, default=16, help="distinct test questions per task (held-out tasks too)"
    )
    p.add_argument("--heldout-steps", type=int, default=30, help="the short finetune on held-out tasks")
    p.add_argument("--cold-method", default="average")
    p.add_argument(
        "--ta-scalings", type=float, nargs="*", default=[0.5, 1.0], help="task_arithmetic's lambdas"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 contributors, 1 round, few steps")
    p.add_argument("--skip", choices=["merging", "cold"], default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.contributors, args.rounds, args.steps, args.cold_steps, args.examples = (
            [0],
            2,
            1,
            10,
            10,
            8,
        )
        args.pretrain_epochs = min(args.pretrain_epochs, 3)
    return args


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so the temporary directory and any child are cleaned up.
    install_stop_handler(lambda signum: sys.exit(128 + signum))
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    merging_rows, cold_rows = [], []
    groups = group_tasks(args.contributors)
    with tempfile.TemporaryDirectory(prefix="fusion-quality-") as tmp:
        tmp = Path(tmp)
        base = args.base if args.base else pretrain_base(tmp, args.pretrain_epochs)
        v0 = build_default_version(tmp / "v0", seed=0)
        for seed in args.seeds:
            work = tmp / f"seed-{seed}"
            multitask = multitask_model(args, seed, base, work)
            if args.skip != "merging":
                merging_rows.append(run_merging(args, seed, base, work / "merging", groups, multitask))
            if args.skip != "cold":
                cold_rows.append(run_cold_fusion(args, seed, base, v0, work / "cold", multitask))
            print(f"\nseed {seed} done after {time.monotonic() - started:.0f}s", flush=True)
            report(args, groups, merging_rows, cold_rows)  # partial results survive an interrupted run
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
