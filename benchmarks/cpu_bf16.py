"""Fusion finetuning in fp32 against bf16 autocast on this CPU, measured in the same run.

    python benchmarks/cpu_bf16.py [--steps 100] [--size tiny] [--processes 2]

Builds version 0 of the built-in model and full-finetunes it with the worker's own loop
(:func:`coldswarm.worker.finetune.train`, what ``join-swarm`` runs) on the embedded tasks'
``default-mixed`` shard, batch 32 at lr 3e-4: once in fp32 (the baseline) and once with
``cpu_bf16``, the path behind ``join-swarm --cpu-bf16``. ``--processes`` copies of each run at once,
one thread each, as ``coldswarm-local`` runs its workers, so that they share the memory bandwidth as
they do there. Prints seconds per step and the ratio to fp32, and both models' fp32 token loss on
the shard's validation records: the speed-up is worth having only where the loss matches. On a CPU
without AVX512-BF16 or AMX the worker stays in fp32, and so does this benchmark's second run (it
says so). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

RUN = """
import itertools, sys, time, torch
torch.set_num_threads(1)
from coldswarm.common.round_options import FusionHyperparameters
from coldswarm.lm.batching import Seq2SeqConfig, instruction_batches
from coldswarm.lm.data import resolve_shard
from coldswarm.lm.tokenizer import load_tokenizer
from coldswarm.worker.devices import load_seq2seq
from coldswarm.worker.finetune import mean_loss, passes, train
version, steps, bf16 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
tok = load_tokenizer(version)
hp = FusionHyperparameters.from_options({"peft_method": "full", "lr": 3e-4, "steps": steps, "batch_size": 32})
s2s = Seq2SeqConfig(max_input_length=hp.max_input_length, max_target_length=hp.max_target_length)
shard = resolve_shard("default-mixed:0-of-2", split="train")
held = list(itertools.islice(resolve_shard("default-mixed:0-of-2", split="validation"), 256))
model = load_seq2seq(version, "cpu")
source = passes(lambda s: instruction_batches(shard, tok, 32, s2s, seed=s, buffer_size=shard.shuffle_buffer))
times = []
train(model, source, hp, "cpu", on_step=lambda *_: times.append(time.perf_counter()), cpu_bf16=bf16)
per_step = (times[-1] - times[4]) / (len(times) - 5)  # past the first steps' warm-up
print(per_step, mean_loss(model, instruction_batches(held, tok, 32, s2s, seed=None), "cpu"))
"""


def run(version: str, steps: int, bf16: bool, processes: int) -> tuple[float, float]:
    """Mean seconds per step and mean validation loss of ``processes`` concurrent runs."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, version, str(steps), "1" if bf16 else "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a run failed (exit {proc.returncode})")
        results.append([float(x) for x in out.split()[-2:]])
    seconds, losses = zip(*results, strict=True)
    return sum(seconds) / len(seconds), sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="finetuning steps per run (the first 5 untimed)")
    p.add_argument("--size", default="tiny", help="built-in model size")
    p.add_argument("--processes", type=int, default=2, help="concurrent single-thread runs of each precision")
    args = p.parse_args()

    from coldswarm.lm.default import build_default_version
    from coldswarm.worker.devices import cpu_bf16_supported

    native = cpu_bf16_supported()
    print(f"this CPU computes bf16 natively: {native}" + ("" if native else " (the second run stays fp32)"))
    with tempfile.TemporaryDirectory(prefix="cpu-bf16-") as tmp:
        version = str(build_default_version(f"{tmp}/v0", size=args.size))
        fp32_s, fp32_loss = run(version, args.steps, False, args.processes)
        bf16_s, bf16_loss = run(version, args.steps, True, args.processes)
    print(f"fp32 (baseline): {fp32_s * 1000:.0f} ms/step, validation token loss {fp32_loss:.3f}")
    print(
        f"--cpu-bf16: {bf16_s * 1000:.0f} ms/step, {fp32_s / bf16_s:.2f}x fp32's steps per second, "
        f"validation token loss {bf16_loss:.3f}"
    )


if __name__ == "__main__":
    main()
