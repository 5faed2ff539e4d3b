"""``coldswarm-model``: build and inspect the embedded default from the command line.

    coldswarm-model build-corpus                     # prints the cached corpus path
    coldswarm-model build-tokenizer                  # prints the cached tokenizer dir
    coldswarm-model build-tasks                      # prints the cached task dir
    coldswarm-model build-default --out v0 [--size tiny|small] [--seed 0]
    coldswarm-model collate [--version DIR] [--n 3] [--inputs-length 128] [--denoiser X-3-0.5]
    coldswarm-model shard SPEC [--data DIR] [--n 3]  # print the first records of a shard spec
    coldswarm-model evaluate VERSION_DIR [--full] [--json]

``--cache-dir`` (or ``$COLDSWARM_CACHE``) moves the build cache from ~/.cache/coldswarm.
Exit status is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coldswarm-model", description=__doc__.split("\n")[0])
    p.add_argument(
        "--cache-dir", default=None, help="build cache (default $COLDSWARM_CACHE or ~/.cache/coldswarm)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build-corpus", help="build the default pretraining corpus; print its path")
    sub.add_parser("build-tokenizer", help="train the default tokenizer; print its directory")
    sub.add_parser("build-tasks", help="generate the default instruction tasks; print their directory")
    b = sub.add_parser("build-default", help="write version 0 (model + tokenizer) to --out")
    b.add_argument("--out", required=True, help="new directory to create")
    b.add_argument("--size", default="tiny", choices=["tiny", "small"])
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("collate", help="print MoD examples made from the default corpus")
    c.add_argument("--version", default=None, help="tokenizer from this dir (default: the default tokenizer)")
    c.add_argument("--n", type=int, default=3, help="examples to print")
    c.add_argument("--inputs-length", type=int, default=128)
    c.add_argument("--denoiser", default=None, help="force one denoiser (e.g. R-3-0.15, X-3-0.5, S)")
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("shard", help="resolve a shard spec and print its first records")
    s.add_argument(
        "spec",
        help="default:<i>-of-<n>, default-mixed:<i>-of-<n>, default:task=<names>, local[:<i>-of-<n>]"
        " or corpus:<i>-of-<n>",
    )
    s.add_argument("--data", default=None, help="the worker's data dir")
    s.add_argument("--split", default="train", choices=["train", "validation", "test"])
    s.add_argument("--n", type=int, default=3)
    s.add_argument(
        "--strict",
        action="store_true",
        help="fail at the first malformed record (default: skip and report it)",
    )
    e = sub.add_parser("evaluate", help="evaluate a version directory")
    e.add_argument("version_dir")
    e.add_argument("--full", action="store_true", help="the larger EvalConfig.full() preset")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"coldswarm-model: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    cache = args.cache_dir
    if args.cmd == "build-corpus":
        from .corpus import build_default_corpus

        print(build_default_corpus(cache_dir=cache))
    elif args.cmd == "build-tokenizer":
        from .tokenizer import build_default_tokenizer

        print(build_default_tokenizer(cache))
    elif args.cmd == "build-tasks":
        from .tasks import build_default_tasks

        print(build_default_tasks(cache_dir=cache))
    elif args.cmd == "build-default":
        from .default import build_default_version

        print(build_default_version(args.out, size=args.size, seed=args.seed, cache_dir=cache))
    elif args.cmd == "collate":
        from .batching import tokenize_documents
        from .corpus import CorpusConfig, iter_documents
        from .mod import MoDCollator, MoDConfig
        from .tokenizer import build_default_tokenizer, load_tokenizer, special_ids

        tok = load_tokenizer(args.version or build_default_tokenizer(cache))
        collator = MoDCollator(special_ids(tok), MoDConfig(inputs_length=args.inputs_length, seed=args.seed))
        docs = tokenize_documents(iter_documents(CorpusConfig(), "heldout"), tok)
        for k, (inputs, targets) in enumerate(collator.iter_examples(docs, args.denoiser)):
            if k == args.n:
                break
            print(f"--- example {k}: {len(inputs)} input ids, {len(targets)} target ids")
            print("inputs: ", tok.decode(inputs))
            print("targets:", tok.decode(targets))
    elif args.cmd == "shard":
        from .data import resolve_shard

        on_error = "raise" if args.strict else "skip"
        shard = resolve_shard(args.spec, args.data, split=args.split, cache_dir=cache, on_error=on_error)
        print(f"# {shard.kind}: {shard.description}")
        for k, rec in enumerate(shard):
            if k == args.n:
                break
            print(json.dumps(rec))
        for error in shard.report.errors:
            print(f"# skipped {error}", file=sys.stderr)
    elif args.cmd == "evaluate":
        from .evaluate import EvalConfig, evaluate_version, format_table

        metrics = evaluate_version(args.version_dir, EvalConfig.full() if args.full else EvalConfig(), cache)
        print(json.dumps(metrics, indent=1) if args.json else format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
