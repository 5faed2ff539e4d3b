"""A swarm peer for the multi-process tests: ``python tests/worker/swarm_peer.py --run-id R --out DIR ...``.

Builds a tiny T5 (about 180K parameters, vocab 256, dropout off) from a seed, trains it with
:class:`coldswarm.worker.swarm.SwarmTrainer` on random-token batches drawn from another seed, and writes
into ``--out``:

* ``ready.json``   once joined (and after any state download): epoch, loaded_state_from_peers, peer_id;
* ``joined.safetensors`` the parameters right after joining (a late joiner's downloaded state);
* ``epoch<k>.safetensors`` the parameters each time this peer enters epoch k (``--snapshots``);
* ``local_only.safetensors`` (``--local-only``, SGD): what this peer's parameters would be had it applied
  only its own epoch-0 gradients (recomputed on a copy of the initial model from the same batches);
* ``final.safetensors`` and ``result.json`` after training;
then keeps serving its state (``--serve``) until the checkpointer announces collection or it is killed.
Random batches are a legitimate test of averaging: the mechanism does not care what the loss means.

It joins as an admitted peer, with the identity, credential and authority that :func:`admit` prepared (what
the worker daemon gets from the coordinator over gRPC), unless ``--open`` (an open swarm).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from coldswarm.swarm.authorizer import CredentialFile
from coldswarm.swarm.credentials import ROLE_WORKER, load_or_create_identity
from coldswarm.swarm.parameters import swarm_parameters
from coldswarm.swarm.security import PeerSecurity
from coldswarm.worker.swarm import SwarmConfig, SwarmTrainer

# Run as a script, this file's folder is on sys.path but tests/ (support's home) is not.
TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
import support  # noqa: E402

VOCAB = 256
#: the peers' model: wider and deeper than support.TINY_T5 so that averaging moves many numbers; no dropout,
#: so that a peer's gradients can be recomputed exactly (the closed-form test)
PEER_T5 = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               dropout_rate=0.0)  # fmt: skip


def tiny_t5(seed: int):
    return support.tiny_t5(seed, **PEER_T5)


def admit(authority, out: Path, run_id: str, lifetime_s: float = 3600.0, worker_id: str = "") -> list[str]:
    """Make a peer's identity in ``out`` and sign it a credential for ``run_id`` with ``authority`` (the
    checkpointer's): the arguments that make ``swarm_peer.py`` join as an admitted peer."""
    from hivemind.utils import get_dht_time

    out.mkdir(parents=True, exist_ok=True)
    key = load_or_create_identity(out / "identity.key")
    credential = authority.issue(
        key.get_public_key().to_bytes(),
        role=ROLE_WORKER,
        run_id=run_id,
        worker_id=worker_id or out.name.replace(".", "-"),
        expires_at=get_dht_time() + lifetime_s,
    )
    CredentialFile(out / "credential").write(credential)
    (out / "authority.pub").write_bytes(authority.public_key_bytes)
    return [
        "--identity",
        str(out / "identity.key"),
        "--credential",
        str(out / "credential"),
        "--authority",
        str(out / "authority.pub"),
    ]


def batches(seed: int, batch_size: int, src_len: int = 24, tgt_len: int = 12):
    generator = torch.Generator().manual_seed(seed)
    while True:
        input_ids = torch.randint(2, VOCAB, (batch_size, src_len), generator=generator)
        labels = torch.randint(2, VOCAB, (batch_size, tgt_len), generator=generator)
        yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def params_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().float().contiguous().clone() for name, p in swarm_parameters(model)}


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_tensors(path: Path, tensors) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def wait_for_file(path: str, timeout: float = 600.0) -> None:
    if path:
        support.wait_for(lambda: os.path.exists(path), timeout, f"{path} to appear")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--initial-peers", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--target-batch-size", type=int, default=32)
    ap.add_argument("--max-epochs", type=int, default=1, help="0: no limit")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--grad-compression", default="uniform8bit")
    ap.add_argument("--matchmaking-time", type=float, default=4.0)
    ap.add_argument("--averaging-timeout", type=float, default=20.0)
    ap.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (slows this peer)")
    ap.add_argument("--snapshots", action="store_true")
    ap.add_argument("--local-only", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--stop-file", default="", help="stop at the next step boundary once this file exists")
    ap.add_argument("--join-file", default="", help="import and build everything, then join once this exists")
    ap.add_argument("--wait-file", default="", help="after joining, wait for this file before training")
    ap.add_argument("--serve", type=float, default=0.0, help="serve state this many seconds after training")
    ap.add_argument("--identity", default="", help="this peer's identity key file (see admit())")
    ap.add_argument("--credential", default="", help="its credential file")
    ap.add_argument("--authority", default="", help="the authority's public key file")
    ap.add_argument("--max-state-jump", type=float, default=0.5)
    ap.add_argument("--aggregator", default="centered_clip")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # several peers share a small machine; oversubscribed threads only thrash
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_t5(args.model_seed)
    initial = copy.deepcopy(model) if args.local_only else None
    config = SwarmConfig(
        run_id=args.run_id,
        initial_peers=[p for p in args.initial_peers.split(",") if p],
        target_batch_size=args.target_batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        max_epochs=args.max_epochs or None,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        request_timeout=min(3.0, args.matchmaking_time / 2),
        grad_compression=args.grad_compression,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        peer_expiration=20.0,
        metrics_period=1.0,
        verbose=args.verbose,
        max_state_jump=args.max_state_jump,
        aggregator=args.aggregator,
    )
    security = None
    if args.identity:
        security = PeerSecurity(
            args.identity, Path(args.authority).read_bytes(), CredentialFile(args.credential)
        )
    epoch0_steps = 0
    reached_epoch1 = False
    seen_epochs = set()
    step_log = []  # (unix time, epoch) after each step

    def on_progress(progress):
        nonlocal epoch0_steps, reached_epoch1
        if not reached_epoch1:
            # Gradients of every step up to and including the one that moved us to epoch 1 went into the
            # epoch-0 global step.
            epoch0_steps += 1
            reached_epoch1 = progress.epoch >= 1
        step_log.append((time.time(), progress.epoch))
        if progress.epoch not in seen_epochs:
            seen_epochs.add(progress.epoch)
            if args.snapshots:
                write_tensors(out / f"epoch{progress.epoch}.safetensors", params_of(model))
        if args.step_delay:
            time.sleep(args.step_delay)
        if args.stop_file and os.path.exists(args.stop_file):
            trainer.stop()

    wait_for_file(args.join_file)
    trainer = SwarmTrainer(model, config, on_progress=on_progress, security=security)
    with trainer:
        seen_epochs.add(trainer.epoch)
        write_tensors(out / "joined.safetensors", params_of(model))
        write_json(
            out / "ready.json",
            dict(
                epoch=trainer.epoch,
                loaded_state_from_peers=trainer.loaded_state_from_peers,
                peer_id=trainer.peer_id,
                maddrs=trainer.visible_maddrs,
            ),
        )
        wait_for_file(args.wait_file)
        result = trainer.train(batches(args.data_seed, args.batch_size))
        write_tensors(out / "final.safetensors", params_of(model))
        if initial is not None:
            # Local-only result of epoch 0 under plain SGD: p0 - lr * mean of this peer's step gradients.
            assert args.optimizer == "sgd"
            grads = {name: torch.zeros_like(p) for name, p in swarm_parameters(initial)}
            for _, batch in zip(range(epoch0_steps), batches(args.data_seed, args.batch_size), strict=False):
                initial.zero_grad()
                initial(**batch).loss.backward()
                for name, p in swarm_parameters(initial):
                    grads[name] += p.grad
            local_only = {
                name: p.detach() - args.lr * grads[name] / epoch0_steps
                for name, p in swarm_parameters(initial)
            }
            write_tensors(out / "local_only.safetensors", {k: v.contiguous() for k, v in local_only.items()})
        write_json(
            out / "result.json",
            dict(
                steps=result.steps,
                samples=result.samples,
                epoch=result.epoch,
                loss=result.loss,
                reason=result.reason,
                local_fallbacks=result.local_fallbacks,
                refusals=result.refusals,
                seconds=result.seconds,
                epoch0_steps=epoch0_steps,
                epoch0_samples=epoch0_steps * args.batch_size,
                step_log=step_log,
                finished_at=time.time(),
            ),
        )
        if args.serve:
            collected = trainer.serve_state(timeout=args.serve)
            write_json(out / "served.json", dict(collected=collected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
