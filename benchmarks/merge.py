"""Benchmark: streaming merge of N contributions vs the I/O floor and vs loading every state dict.

    python benchmarks/merge.py                 # 8 contributions of a ~100M-parameter T5 (needs ~8 GB disk)
    python benchmarks/merge.py --size small    # a quick check (~10M parameters)

It builds a T5 config of the chosen size (no download), writes a random base checkpoint and N
"finetuned" full-weight contributions (base + a small rank-1 delta per matrix, with a Fisher for
every parameter) into a temporary directory, then runs each case in a fresh subprocess and prints:

* wall time of ``merge_checkpoints`` with ``average``, ``fisher`` and ``ties``, against the I/O floor
  measured in the same run (reading exactly the tensors the method reads, in the same chunks, and
  writing the output -- no arithmetic);
* peak RSS (the child's VmHWM) against one model's bytes, and what the merge added above the RSS
  of the interpreter after importing torch and coldswarm.fusion;
* the naive baseline: load every contribution's state dict, average, save.

Targets (printed, never asserted): average <= 2x its I/O floor; peak RSS <= 1.5x one model's bytes.
Timings depend on the machine and on its load; compare ratios from the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

SIZES = {
    # ~101M parameters (fp32: ~405 MB): T5 with d_model 512, 12+12 layers, the T5 vocabulary
    "100m": dict(
        vocab_size=32128, d_model=512, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=8, d_kv=64
    ),
    # ~10M parameters: a quick check of the script itself
    "small": dict(
        vocab_size=8000, d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64
    ),
}


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


# ---------------------------------------------------------------------------------------------
# setup


def build(work: Path, size: str, n: int) -> dict:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from coldswarm.fusion.checkpoint import CheckpointReader, ModelDirWriter, SafetensorsWriter
    from coldswarm.fusion.contribution import METADATA_KEY, ContributionMeta

    cfg = T5Config(**SIZES[size], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    specs = {name: (torch.float32, tuple(p.shape)) for name, p in model.named_parameters()}
    n_params = sum(torch.Size(s).numel() for _, s in specs.values())

    def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * 0.05

    t0 = time.perf_counter()
    base_dir = work / "base"
    with ModelDirWriter(base_dir, {"model.safetensors": specs}, metadata={"format": "pt"}) as w:
        for name, (_, shape) in specs.items():
            w.write(name, base_tensor(name, shape))
    cfg.to_json_file(base_dir / "config.json")
    meta = {METADATA_KEY: ContributionMeta(form="full", base_version=0, num_examples=100).to_json()}
    paths = []
    base = CheckpointReader(base_dir)
    for i in range(n):
        cspecs = {}
        for name, (dt, shape) in specs.items():
            cspecs[f"weight/{name}"] = (dt, shape)
            cspecs[f"fisher/{name}"] = (dt, shape)
        path = work / f"contribution-{i}.safetensors"
        w = SafetensorsWriter(path, cspecs, meta)
        g = torch.Generator().manual_seed(1000 + i)
        for name, (_, shape) in specs.items():
            b = base.get(name)
            # a cheap "finetune": a rank-1 update per matrix, a small shift per vector
            if len(shape) == 2:
                d = torch.outer(torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)) * 1e-3
            else:
                d = torch.randn(shape, generator=g) * 1e-3
            w.write(f"weight/{name}", b + d)
            w.write(f"fisher/{name}", (b + d).square() * (i + 1) + 1e-4)
        w.close()
        paths.append(str(path))
    base.close()
    return {"base": str(base_dir), "contributions": paths, "n_params": n_params,
            "model_bytes": 4 * n_params, "setup_s": time.perf_counter() - t0}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# cases (each runs in its own process)


def case_io_floor(setup: dict, out: Path, with_fisher: bool, chunk_mb: float = 64.0) -> None:
    """Read what a merge reads (base + each contribution's weights [+ Fishers]) in the driver's
    chunks, and write an output of the base's layout: the floor no merge can beat."""
    import torch

    from coldswarm.fusion.checkpoint import CheckpointReader, ModelDirWriter, SafetensorsFile

    base = CheckpointReader(setup["base"])
    contribs = [SafetensorsFile(p) for p in setup["contributions"]]
    layout = {f: {n: (base.dtype(n), base.shape(n)) for n in names} for f, names in base.layout().items()}
    n = len(contribs)
    pool = torch.empty(0, dtype=torch.float32)
    with ModelDirWriter(out, layout, setup["base"], {"format": "pt"}) as w:
        for name in base.names():
            shape = base.shape(name)
            rows = shape[0] if shape else 1
            row_bytes = base.nbytes(name) // rows
            step = max(1, int(chunk_mb * 2**20) // (row_bytes * (n * (2 if with_fisher else 1) + 4)))
            for s in range(0, rows, step):
                e = min(rows, s + step)
                shp = (e - s, *shape[1:]) if shape else ()
                m = (e - s) * (base.nbytes(name) // rows // 4)
                if pool.numel() < 2 * m:  # reused buffers, as the merge driver does: no fresh pages per read
                    pool = torch.empty(2 * m, dtype=torch.float32)
                b = base.get_rows(name, s, e, out=pool[:m].view(shp))
                for c in contribs:
                    c.get_rows(f"weight/{name}", s, e, out=pool[m : 2 * m].view(shp))
                    if with_fisher:
                        c.get_rows(f"fisher/{name}", s, e, out=pool[m : 2 * m].view(shp))
                w.write_rows(name, s, b)


def case_merge(setup: dict, out: Path, method: str) -> dict:
    from coldswarm.fusion.merge import merge_checkpoints

    r = merge_checkpoints(setup["base"], setup["contributions"], method, {}, out)
    return {k: v for k, v in r["timings"].items() if k != "slowest_tensors"}


def case_naive(setup: dict, out: Path) -> None:
    """The baseline: load every contribution's full state dict, then average, then save."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    states = []
    for p in setup["contributions"]:
        with safe_open(p, "pt") as f:
            states.append({k[len("weight/") :]: f.get_tensor(k) for k in f.keys() if k.startswith("weight/")})
    merged = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    out.mkdir()
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})


def run_case(args) -> None:
    import torch

    import coldswarm.fusion.merge  # noqa: F401  (imports count in the baseline RSS, not the merge)

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = json.loads(Path(args.setup).read_text())
    before = status_kb("VmRSS")
    out = Path(args.out)
    t0 = time.perf_counter()
    extra = {}
    if args.case == "io_floor":
        case_io_floor(setup, out, with_fisher=False)
    elif args.case == "io_floor_fisher":
        case_io_floor(setup, out, with_fisher=True)
    elif args.case == "naive_average":
        case_naive(setup, out)
    else:
        extra = case_merge(setup, out, args.case)
    wall = time.perf_counter() - t0
    print(
        "RESULT "
        + json.dumps({"wall_s": wall, "rss_before_kb": before, "hwm_kb": status_kb("VmHWM"), **extra})
    )


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size (default: 100m)")
    ap.add_argument("--contributions", type=int, default=8, help="number of contributions (default: 8)")
    ap.add_argument("--methods", default="average,fisher,ties", help="comma-separated merge methods")
    ap.add_argument("--workdir", help="where to write checkpoints (default: a temp dir, removed afterwards); "
                    "an existing one from an earlier run is reused")  # fmt: skip
    ap.add_argument(
        "--no-naive", action="store_true", help="skip the load-everything baseline (needs N models of RAM)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per case, fastest kept (default 3; timings on a "
                    "shared machine are noisy)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default); "
                    "use 1 on a loaded machine to avoid oversubscribed spinning")  # fmt: skip
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return run_case(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="coldswarm-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if (work / "setup.json").exists():  # --workdir of an earlier run: reuse its checkpoints
            setup = json.loads((work / "setup.json").read_text())
            print(f"reusing the checkpoints in {work}", flush=True)
        else:
            print(
                f"building a {args.size} T5 base and {args.contributions} contributions in {work} ...",
                flush=True,
            )
            setup = build(work, args.size, args.contributions)
            (work / "setup.json").write_text(json.dumps(setup))
        # Warm the page cache so that no case pays for reading from disk what a later case gets from RAM.
        for p in [Path(setup["base"]) / "model.safetensors", *map(Path, setup["contributions"])]:
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        mb = setup["model_bytes"] / 2**20
        print(f"  {setup['n_params'] / 1e6:.1f}M parameters, {mb:.0f} MiB per model (fp32); "
              f"inputs {mb * 2 * args.contributions:.0f} MiB (weights + Fishers); setup {setup['setup_s']:.0f}s")  # fmt: skip
        cases = (
            ["io_floor", "io_floor_fisher"]
            + args.methods.split(",")
            + ([] if args.no_naive else ["naive_average"])
        )
        # Round-robin over the cases (not all repeats of one case, then the next): on a shared machine
        # the load drifts, and interleaving lets every case see the same conditions.
        runs: dict[str, list[dict]] = {c: [] for c in cases}
        failed: set[str] = set()
        for rep in range(args.repeat):
            for case in cases:
                if case in failed:
                    continue
                out = work / f"out-{case}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, __file__, "--case", case, "--setup", str(work / "setup.json"), "--out",
                       str(out), "--threads", str(args.threads)]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True)
                shutil.rmtree(out, ignore_errors=True)
                if res.returncode != 0:
                    print(f"  {case}: FAILED\n{res.stderr[-3000:]}")
                    failed.add(case)
                    continue
                line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
                runs[case].append(json.loads(line[len("RESULT ") :]))
                print(f"  run {rep + 1}: {case:>16} {runs[case][-1]['wall_s']:7.2f} s", flush=True)
        results = {}
        for case, rs in runs.items():
            if not rs:
                continue
            r = dict(min(rs, key=lambda x: x["wall_s"]))  # the fastest run; the largest RSS of all runs
            r["hwm_kb"] = max(x["hwm_kb"] for x in rs)
            r["rss_before_kb"] = min(x["rss_before_kb"] for x in rs)
            results[case] = r
        print(f"\n(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch threads: "
              f"{args.threads or 'default'})")  # fmt: skip
        print(
            f"{'case':>16} {'wall s':>8} {'x I/O floor':>12} {'peak RSS MiB':>13} {'x model':>8} {'+ over imports':>15}"
        )
        for case, r in results.items():
            floor = results.get("io_floor_fisher" if case in ("fisher", "io_floor_fisher") else "io_floor")
            ratio = r["wall_s"] / floor["wall_s"] if floor else float("nan")
            hwm = r["hwm_kb"] / 1024
            print(
                f"{case:>16} {r['wall_s']:8.2f} {ratio:12.2f} {hwm:13.0f} {hwm / mb:8.2f} {(r['hwm_kb'] - r['rss_before_kb']) / 1024:13.0f} MiB"
            )
        if "average" in results and "io_floor" in results:
            a, f = results["average"], results["io_floor"]
            print()
            print(f"target: average <= 2x I/O floor: {a['wall_s'] / f['wall_s']:.2f}x "
                  f"({'met' if a['wall_s'] <= 2 * f['wall_s'] else 'MISSED'})")  # fmt: skip
            print(f"target: peak RSS <= 1.5x one model: {a['hwm_kb'] / 1024 / mb:.2f}x "
                  f"({'met' if a['hwm_kb'] / 1024 <= 1.5 * mb else 'MISSED'})")  # fmt: skip
            if "naive_average" in results:
                nv = results["naive_average"]
                print(f"naive load-all baseline: {nv['wall_s'] / a['wall_s']:.2f}x the streaming average's time, "
                      f"{nv['hwm_kb'] / a['hwm_kb']:.2f}x its peak RSS")  # fmt: skip
        for case in ("average", "fisher", "ties"):
            if case in results and "read_s" in results[case]:
                r = results[case]
                print(f"{case}: read+materialise {r['read_s']:.1f}s, math {r['math_s']:.1f}s, write {r['write_s']:.1f}s, "
                      f"prepass {r['prepass_s']:.1f}s")  # fmt: skip
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
    main()
