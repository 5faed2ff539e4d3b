"""Benchmark: streaming merge of N contributions vs its I/O floor, a load-everything baseline and mergekit.

    python benchmarks/merge.py --threads 1                  # 8 contributions of a 92M-parameter T5 (~11 GB disk)
    python benchmarks/merge.py --size small                 # a quick check (~10M parameters)
    python benchmarks/merge.py --threads 1 --peer mergekit  # also run mergekit on the same inputs

It builds a T5 v1.1-style config (gated FF, as mergekit's T5 definition expects; no download), writes a
random base checkpoint and N "finetuned" full-weight contributions (base + a small rank-1 delta per
matrix, a Fisher for every parameter, a Gram for every linear layer) into a work directory, then runs
each case in a fresh subprocess, interleaved, and prints per case:

* in-process wall time of ``merge_checkpoints`` (imports excluded) against the I/O floor measured in
  the same run -- reading exactly what the method reads (weights; + Fishers for ``fisher``; + Grams for
  ``regmean``) in the driver's chunks and writing the output, with no arithmetic;
* peak RSS (the child's VmHWM) against one model's bytes, and what the case added above the RSS of the
  interpreter after its imports;
* the naive baseline: load every contribution's state dict, average, save;
* with ``--peer mergekit`` (where it is installed): mergekit's ``run_merge`` on the same weights
  (saved as HF model directories), its time against coldswarm's for the same merge, and the max abs
  difference of the two outputs. Option mapping: mergekit ``linear`` with weight 1.0 each
  (``normalize: true``) is coldswarm ``average``; mergekit ``ties`` with ``density`` and weight 1.0
  each, ``normalize: true``, base model = the base, is coldswarm ``ties`` (``trim="tensor"``,
  ``scaling=1``). They differ where a sum of trimmed deltas is exactly 0 (mergekit elects +, coldswarm
  no sign) and in k: mergekit keeps floor(density * n) entries, coldswarm round(density * n).

Cases are method names, optionally with options: ``ties@trim=global@density=0.1``.
Targets (printed, never asserted): every method <= 1.5x its I/O floor (RegMean <= 3x); peak RSS <= 1.5x
one model's bytes. Timings depend on the machine and on its load; compare ratios from the same run only.
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

SETUP_FORMAT = 3  # bump when build() writes something else; an older --workdir is rebuilt
COMMON = dict(feed_forward_proj="gated-gelu", num_heads=8, d_kv=64, decoder_start_token_id=0, pad_token_id=0,
              eos_token_id=1)  # fmt: skip
SIZES = {
    # 92.0M parameters (fp32: 368 MB): d_model 512, 12+12 layers, gated FF 1024, the T5 vocabulary
    "92m": dict(vocab_size=32128, d_model=512, d_ff=1024, num_layers=12, num_decoder_layers=12),
    # ~10M parameters: a quick check of the script itself
    "small": dict(vocab_size=8000, d_model=256, d_ff=512, num_layers=4, num_decoder_layers=4),
}
METHODS = ["average", "fisher", "regmean", "task_arithmetic", "ties", "ties@trim=global", "dare", "median",
           "trimmed_mean"]  # fmt: skip
FLOORS = {"fisher": "io_floor_fisher", "regmean": "io_floor_gram"}  # other methods read only weights
PEERS = {"mergekit": {"mergekit_linear": "average", "mergekit_ties": "ties"}}
TARGET = {"regmean": 3.0}  # x its I/O floor; 1.5 for the others


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def parse_case(case: str) -> tuple[str, dict]:
    """'ties@trim=global@density=0.1' -> ('ties', {'trim': 'global', 'density': 0.1})."""
    name, *pairs = case.split("@")
    opts = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            opts[k] = json.loads(v)
        except ValueError:
            opts[k] = v
    return name, opts


# ---------------------------------------------------------------------------------------------
# setup


def _base_tensor(name: str, shape: tuple[int, ...]):
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * 0.05


def _gram(module: str, d_in: int, i: int):
    """A Gram like collect_gram's (mean of x^T x over 256 tokens, rank-deficient, correlated inputs),
    different per contribution: one shared token matrix, rescaled per input dimension."""
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(module.encode()))
    x = torch.randn(256, d_in, generator=g) @ (torch.eye(d_in) + 0.1 * torch.randn(d_in, d_in, generator=g))
    scale = 1 + 0.5 * torch.rand(d_in, generator=torch.Generator().manual_seed(7 + i))
    return (x * scale).T @ (x * scale) / 256


def build(work: Path, size: str, n: int) -> dict:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from coldswarm.fusion.checkpoint import CheckpointReader, ModelDirWriter, SafetensorsWriter
    from coldswarm.fusion.contribution import METADATA_KEY, ContributionMeta

    cfg = T5Config(**SIZES[size], **COMMON, architectures=["T5ForConditionalGeneration"])  # mergekit reads it
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    specs = {name: (torch.float32, tuple(p.shape)) for name, p in model.named_parameters()}
    linear = {name[: -len(".weight")]: shape[1] for name, (_, shape) in specs.items()
              if len(shape) == 2 and name != "shared.weight" and "relative_attention_bias" not in name}  # fmt: skip
    t0 = time.perf_counter()
    base_dir = work / "base"
    with ModelDirWriter(base_dir, {"model.safetensors": specs}, metadata={"format": "pt"}) as w:
        for name, (_, shape) in specs.items():
            w.write(name, _base_tensor(name, shape))
    cfg.to_json_file(base_dir / "config.json")
    meta = {METADATA_KEY: ContributionMeta(form="full", base_version=0, num_examples=100).to_json()}
    paths = []
    with CheckpointReader(base_dir) as base:
        for i in range(n):
            cspecs = {f"{ns}/{name}": spec for name, spec in specs.items() for ns in ("weight", "fisher")}
            cspecs |= {f"gram/{m}": (torch.float32, (d, d)) for m, d in linear.items()}
            path = work / f"contribution-{i}.safetensors"
            w = SafetensorsWriter(path, cspecs, meta)
            g = torch.Generator().manual_seed(1000 + i)
            for name, (_, shape) in specs.items():
                b = base.get(name)
                # a cheap "finetune": a rank-1 update per matrix, a small shift per vector
                if len(shape) == 2:
                    d = (
                        torch.outer(torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g))
                        * 1e-3
                    )
                else:
                    d = torch.randn(shape, generator=g) * 1e-3
                w.write(f"weight/{name}", b + d)
                w.write(f"fisher/{name}", (b + d).square() * (i + 1) + 1e-4)
            for m, d_in in linear.items():
                w.write(f"gram/{m}", _gram(m, d_in, i))
            w.close()
            paths.append(str(path))
    n_params = sum(torch.Size(s).numel() for _, s in specs.values())
    return {"format": SETUP_FORMAT, "size": size, "base": str(base_dir), "contributions": paths,
            "n_params": n_params, "model_bytes": 4 * n_params, "setup_s": time.perf_counter() - t0}  # fmt: skip


def build_peer_dirs(work: Path, setup: dict) -> list[str]:
    """Each contribution's weights as an HF model directory (what mergekit reads)."""
    from coldswarm.fusion.checkpoint import write_model_dir
    from coldswarm.fusion.contribution import open_contribution

    dirs = []
    for i, p in enumerate(setup["contributions"]):
        d = work / f"hf-{i}"
        if not (d / "model.safetensors").exists():
            with open_contribution(p) as c:
                weights = {name: c.get(f"weight/{name}") for name in c.entries("weight")}
            write_model_dir(d, weights, base_dir=setup["base"], overwrite=True)
        dirs.append(str(d))
    return dirs


# ---------------------------------------------------------------------------------------------
# cases (each runs in its own process)


def case_io_floor(setup: dict, out: Path, extra: str | None, chunk_mb: float = 64.0) -> None:
    """Read what a merge reads (base + each contribution's weights [+ Fishers | + Grams]) in the
    driver's chunks, and write an output of the base's layout: the floor no merge can beat."""
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
            gram = f"gram/{name.removesuffix('.weight')}"
            if extra == "gram" and gram in contribs[0]:
                for c in contribs:  # RegMean reads every Gram of a layer whole
                    c.get(gram)
            row_bytes = base.nbytes(name) // rows
            step = max(1, int(chunk_mb * 2**20) // (row_bytes * (n * (2 if extra == "fisher" else 1) + 4)))
            for s in range(0, rows, step):
                e = min(rows, s + step)
                shp = (e - s, *shape[1:]) if shape else ()
                m = (e - s) * (row_bytes // 4)
                if pool.numel() < 2 * m:  # reused buffers, as the merge driver does: no fresh pages per read
                    pool = torch.empty(2 * m, dtype=torch.float32)
                b = base.get_rows(name, s, e, out=pool[:m].view(shp))
                for c in contribs:
                    c.get_rows(f"weight/{name}", s, e, out=pool[m : 2 * m].view(shp))
                    if extra == "fisher":
                        c.get_rows(f"fisher/{name}", s, e, out=pool[m : 2 * m].view(shp))
                w.write_rows(name, s, b)


def case_merge(setup: dict, out: Path, case: str) -> dict:
    from coldswarm.fusion.merge import merge_checkpoints

    method, opts = parse_case(case)
    r = merge_checkpoints(setup["base"], setup["contributions"], method, opts, out)
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


def case_mergekit(setup: dict, out: Path, case: str) -> None:
    """mergekit's run_merge on the contributions' HF directories (the mapping is in the docstring)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    if case == "mergekit_linear":
        cfg = {"merge_method": "linear", "models": [{"model": d, "parameters": {"weight": 1.0}}
                                                    for d in setup["peer_dirs"]]}  # fmt: skip
    else:
        cfg = {"merge_method": "ties", "base_model": setup["base"],
               "models": [{"model": d, "parameters": {"weight": 1.0, "density": 0.2}} for d in setup["peer_dirs"]]}  # fmt: skip
    cfg |= {"parameters": {"normalize": True}, "dtype": "float32"}
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)


def run_case(args) -> None:
    import torch

    import coldswarm.fusion.merge  # noqa: F401  (imports count in the baseline RSS, not the merge)

    if args.case.startswith("mergekit"):
        import mergekit.merge  # noqa: F401
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = json.loads(Path(args.setup).read_text())
    before = status_kb("VmRSS")
    out = Path(args.out)
    t0 = time.perf_counter()
    extra = {}
    if args.case.startswith("io_floor"):
        case_io_floor(setup, out, args.case.removeprefix("io_floor").removeprefix("_") or None)
    elif args.case == "naive_average":
        case_naive(setup, out)
    elif args.case.startswith("mergekit"):
        case_mergekit(setup, out, args.case)
    else:
        extra = case_merge(setup, out, args.case)
    wall = time.perf_counter() - t0
    print(
        "RESULT "
        + json.dumps({"wall_s": wall, "rss_before_kb": before, "hwm_kb": status_kb("VmHWM"), **extra})
    )


# ---------------------------------------------------------------------------------------------
# the driver


def load_or_build(work: Path, args) -> dict:
    setup_file = work / "setup.json"
    if setup_file.exists():
        setup = json.loads(setup_file.read_text())
        if setup.get("format") == SETUP_FORMAT and setup.get("size") == args.size:
            print(f"reusing the checkpoints in {work}", flush=True)
            return setup
    print(f"building a {args.size} T5 base and {args.contributions} contributions in {work} ...", flush=True)
    for old in ["base", *(p.name for p in work.glob("hf-*")), *(p.name for p in work.glob("out-*"))]:
        shutil.rmtree(work / old, ignore_errors=True)  # an earlier format's checkpoints
    setup = build(work, args.size, args.contributions)
    setup_file.write_text(json.dumps(setup))
    return setup


def peer_cases(work: Path, setup: dict, peer: str | None) -> list[str]:
    if peer is None:
        return []
    try:
        import mergekit  # noqa: F401
    except ImportError:
        print(f"--peer {peer}: {peer} is not installed in this environment; skipping its cases "
              f"(pip install {peer} without letting it replace torch: see fusion/README.md)")  # fmt: skip
        return []
    setup["peer_dirs"] = build_peer_dirs(work, setup)
    (work / "setup.json").write_text(json.dumps(setup))
    return list(PEERS[peer])


def run_all(work: Path, cases: list[str], args, keep: set[str]) -> dict[str, list[dict]]:
    """Round-robin over the cases (not all repeats of one case, then the next): on a shared machine the
    load drifts, and interleaving lets every case see the same conditions. Outputs of ``keep`` stay."""
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    failed: set[str] = set()
    for rep in range(args.repeat):
        for case in cases:
            if case in failed or (case.startswith("mergekit") and rep >= args.peer_repeat):
                continue
            out = work / f"out-{case}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, __file__, "--case", case, "--setup", str(work / "setup.json"), "--out",
                   str(out), "--threads", str(args.threads)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True)
            if case not in keep:
                shutil.rmtree(out, ignore_errors=True)
            if res.returncode != 0:
                print(f"  {case}: FAILED\n{res.stderr[-3000:]}")
                failed.add(case)
                continue
            line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
            runs[case].append(json.loads(line[len("RESULT ") :]))
            print(f"  run {rep + 1}: {case:>18} {runs[case][-1]['wall_s']:7.2f} s", flush=True)
    return runs


def best_of(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """The fastest run of each case, with the largest peak RSS of all its runs."""
    results = {}
    for case, rs in runs.items():
        if rs:
            r = dict(min(rs, key=lambda x: x["wall_s"]))
            r["hwm_kb"] = max(x["hwm_kb"] for x in rs)
            r["rss_before_kb"] = min(x["rss_before_kb"] for x in rs)
            results[case] = r
    return results


def max_abs_diff(a_dir: Path, b_dir: Path) -> float:
    from coldswarm.fusion.checkpoint import CheckpointReader

    worst = 0.0
    with CheckpointReader(a_dir) as a, CheckpointReader(b_dir) as b:
        for name in a.names():
            if name in b:
                worst = max(worst, float((a.get(name).double() - b.get(name).double()).abs().max()))
    return worst


def report(results: dict[str, dict], setup: dict, work: Path, args) -> None:
    if not results:
        return
    mb = setup["model_bytes"] / 2**20
    print(f"\n(load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"torch threads: {args.threads or 'default'})")  # fmt: skip
    print(f"{'case':>18} {'wall s':>8} {'x I/O floor':>12} {'target':>7} {'peak RSS MiB':>13} {'x model':>8} "
          f"{'+ over imports':>15}")  # fmt: skip
    for case, r in results.items():
        method = parse_case(case)[0]
        floor = results.get(
            FLOORS.get(method, "io_floor") if not case.startswith(("io_", "mergekit")) else case
        )
        ratio = r["wall_s"] / floor["wall_s"] if floor else float("nan")
        target = TARGET.get(method, 1.5)
        verdict = (
            "" if case.startswith(("io_", "naive", "mergekit")) else ("met" if ratio <= target else "MISSED")
        )
        hwm = r["hwm_kb"] / 1024
        print(f"{case:>18} {r['wall_s']:8.2f} {ratio:12.2f} {verdict:>7} {hwm:13.0f} {hwm / mb:8.2f} "
              f"{(r['hwm_kb'] - r['rss_before_kb']) / 1024:13.0f} MiB")  # fmt: skip
    worst_rss = max(
        (r["hwm_kb"] / 1024 / mb, c) for c, r in results.items() if not c.startswith(("naive", "mergekit"))
    )
    print(f"\ntarget: peak RSS <= 1.5x one model ({mb:.0f} MiB): worst {worst_rss[0]:.2f}x ({worst_rss[1]}) "
          f"({'met' if worst_rss[0] <= 1.5 else 'MISSED'})")  # fmt: skip
    if "naive_average" in results and "average" in results:
        nv, a = results["naive_average"], results["average"]
        print(f"naive load-all baseline: {nv['wall_s'] / a['wall_s']:.2f}x the streaming average's time, "
              f"{nv['hwm_kb'] / a['hwm_kb']:.2f}x its peak RSS")  # fmt: skip
    for peer_case, ours in PEERS.get(args.peer or "", {}).items():
        if peer_case in results and ours in results:
            p, o = results[peer_case], results[ours]
            diff = max_abs_diff(work / f"out-{ours}", work / f"out-{peer_case}")
            print(f"{peer_case} vs {ours}: coldswarm {o['wall_s']:.2f} s = {o['wall_s'] / p['wall_s']:.3f}x mergekit's "
                  f"{p['wall_s']:.2f} s; peak RSS {o['hwm_kb'] / p['hwm_kb']:.2f}x; max |difference| {diff:.3g}")  # fmt: skip
    for case, r in results.items():
        if "read_s" in r:
            print(f"{case}: read+materialise {r['read_s']:.1f}s, math {r['math_s']:.1f}s, write {r['write_s']:.1f}s, "
                  f"prepass {r['prepass_s']:.1f}s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="92m", help="model size (default: 92m)")
    ap.add_argument("--contributions", type=int, default=8, help="number of contributions (default: 8)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated cases: method names, "
                    "optionally with options (ties@trim=global); default: every method")  # fmt: skip
    ap.add_argument("--workdir", help="where to write checkpoints (default: a temp dir, removed afterwards); "
                    "an existing one from an earlier run is reused")  # fmt: skip
    ap.add_argument(
        "--no-naive", action="store_true", help="skip the load-everything baseline (needs N models of RAM)"
    )
    ap.add_argument(
        "--peer", choices=sorted(PEERS), help="also run this tool on the same inputs (where installed)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per case, fastest kept (default 3; timings on a "
                    "shared machine are noisy)")  # fmt: skip
    ap.add_argument(
        "--peer-repeat", type=int, default=1, help="runs per peer case (default 1: mergekit is slow)"
    )
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
        setup = load_or_build(work, args)
        methods = args.methods.split(",")
        cases = [
            "io_floor",
            "io_floor_fisher",
            "io_floor_gram",
            *methods,
            *([] if args.no_naive else ["naive_average"]),
        ]
        cases += peer_cases(work, setup, args.peer)
        # Warm the page cache so that no case pays for reading from disk what a later case gets from RAM.
        for p in [Path(setup["base"]) / "model.safetensors", *map(Path, setup["contributions"])]:
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        mb = setup["model_bytes"] / 2**20
        print(f"  {setup['n_params'] / 1e6:.1f}M parameters, {mb:.0f} MiB per model (fp32); "
              f"{args.contributions} contributions (weights, Fishers, Grams); setup {setup['setup_s']:.0f}s")  # fmt: skip
        keep = {o for peer in PEERS.get(args.peer or "", {}).items() for o in peer}
        report(best_of(run_all(work, cases, args, keep)), setup, work, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
    main()
