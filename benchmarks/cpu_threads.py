"""Training step time on a CPU shared with other work, by thread count, measured in the same run.

    python benchmarks/cpu_threads.py [--busy 2] [--steps 10] [--size tiny]

Times forward, backward and AdamW of the built-in model on a fusion-sized batch (4 x 64 -> 32)
with torch's default thread count on an idle machine (the baseline), then while ``--busy``
processes spin on the CPU, with the default thread count and with each smaller count down to 1.
Prints each as a ratio of the baseline (1.0 = as fast as idle; higher is slower): the figure behind
``join-swarm --cpu-threads``. Each measurement runs in its own process, so thread pools do not mix.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

STEP = """
import sys, time, torch
from coldswarm.lm.model import build_model
threads, steps, size = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if threads:
    torch.set_num_threads(threads)
model = build_model(size)
vocab = model.config.vocab_size
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(2, vocab, (4, 64)); y = torch.randint(2, vocab, (4, 32))
def step():
    model(input_ids=x, labels=y).loss.backward(); opt.step(); opt.zero_grad()
step(); step()
began = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - began) / steps)
"""


def spin() -> None:
    while True:
        pass


def step_seconds(threads: int, steps: int, size: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(threads), str(steps), size],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", type=int, default=2, help="processes spinning on the CPU meanwhile")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after 2 warm-up)")
    p.add_argument("--size", default="tiny", help="built-in model size")
    args = p.parse_args()

    cores = os.cpu_count() or 1
    baseline = step_seconds(0, args.steps, args.size)
    print(f"{cores} cores; idle, default threads: {baseline * 1000:.0f} ms/step (baseline)")
    spinners = [mp.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for proc in spinners:
        proc.start()
    try:
        time.sleep(0.5)
        for threads in [0, *range(cores, 0, -1)]:
            seconds = step_seconds(threads, args.steps, args.size)
            label = "default threads" if threads == 0 else f"--cpu-threads {threads}"
            print(
                f"{args.busy} busy processes, {label}: {seconds * 1000:.0f} ms/step, "
                f"{seconds / baseline:.2f}x the idle baseline"
            )
    finally:
        for proc in spinners:
            proc.terminate()
            proc.join()


if __name__ == "__main__":
    main()
