"""A hostile (or broken) swarm peer written against hivemind's public API only: ``hivemind.DHT`` and
``hivemind.Optimizer``, no coldswarm trainer. What an outsider, or an admitted peer that went rogue, can run.

    python tests/swarm/attacker_peer.py --run-id R --initial-peers MADDR,... --out DIR
        [--identity F --credential F --authority F]     # an admitted peer (else: an outsider, no credential)
        [--grads nan|scale] [--scale 1e4]                # what it sends into the gradient all-reduce
        [--params nan|scale] [--fake-epoch N]            # the state it serves (and the epoch it claims)
        [--max-epochs N] [--serve S]

The only coldswarm pieces an admitted attacker touches are its credential's transport (hivemind's token
authorizer needs an implementation: the one every peer of the swarm uses) and the record that publishes the
credential on the DHT; its averagers, tracker, optimizer and codecs are hivemind's own, unguarded. It writes
``ready.json`` once joined and ``result.json`` when done, then serves its state for ``--serve`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import hivemind
import torch
from hivemind.compression import Float16Compression, Uniform8BitQuantization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
import swarm_peer  # noqa: E402  - the same tiny T5 and batches as the honest peers

CODECS = {"fp16": Float16Compression, "uniform8bit": Uniform8BitQuantization}


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def start_dht(args) -> hivemind.DHT:
    peers = [p for p in args.initial_peers.split(",") if p]
    kwargs = dict(initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    if not args.identity:  # an outsider: a plain hivemind peer; the swarm does not answer its bootstrap ping
        return hivemind.DHT(ensure_bootstrap_success=False, **kwargs)
    from coldswarm.swarm.authorizer import CredentialFile, SwarmAuthorizer
    from coldswarm.swarm.credentials import load_or_create_identity, owner_marker
    from coldswarm.swarm.records import admitted_key

    key = load_or_create_identity(args.identity)
    credentials = CredentialFile(args.credential)
    authorizer = SwarmAuthorizer(key, Path(args.authority).read_bytes(), credentials)
    dht = hivemind.DHT(
        identity_path=args.identity,
        authorizer=authorizer,
        record_validators=[RSASignatureValidator(key)],
        **kwargs,
    )
    token = credentials.current()
    dht.store(
        admitted_key(args.run_id),
        subkey=owner_marker(key.get_public_key().to_bytes()),
        value=token.SerializeToString(),
        expiration_time=float(token.expiration_time),
    )
    return dht


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--initial-peers", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--identity", default="")
    ap.add_argument("--credential", default="")
    ap.add_argument("--authority", default="")
    ap.add_argument("--grads", choices=["honest", "nan", "scale"], default="honest")
    ap.add_argument("--params", choices=["honest", "nan", "scale"], default="honest")
    ap.add_argument("--scale", type=float, default=1e4)
    ap.add_argument("--fake-epoch", type=int, default=0, help="claim this epoch for the state it serves")
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=99)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--target-batch-size", type=int, default=48)
    ap.add_argument("--max-epochs", type=int, default=0, help="0: do not train")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--grad-compression", default="uniform8bit", choices=sorted(CODECS))
    ap.add_argument("--matchmaking-time", type=float, default=8.0)
    ap.add_argument("--averaging-timeout", type=float, default=30.0)
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--wait-file", default="")
    ap.add_argument("--serve", type=float, default=0.0)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = swarm_peer.tiny_t5(args.model_seed)
    dht = start_dht(args)
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=args.run_id,
        target_batch_size=args.target_batch_size,
        batch_size_per_step=args.batch_size,
        params=[p for p in model.parameters() if p.requires_grad],
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr),
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        use_local_updates=False,
        average_state_every=1,
        offload_optimizer=True,
        grad_compression=CODECS[args.grad_compression](),
        state_averaging_compression=Float16Compression(),
        averager_opts=dict(request_timeout=3.0),
        verbose=True,
    )
    write_json(
        out / "ready.json", dict(peer_id=str(dht.peer_id), maddrs=[str(a) for a in dht.get_visible_maddrs()])
    )
    while args.wait_file and not os.path.exists(args.wait_file):
        time.sleep(0.1)
    steps = 0
    if args.max_epochs:
        for batch in swarm_peer.batches(args.data_seed, args.batch_size):
            if opt.local_epoch >= args.max_epochs:
                break
            model(**batch).loss.backward()
            for p in model.parameters():
                if p.grad is not None and args.grads == "nan":
                    p.grad.fill_(float("nan"))
                elif p.grad is not None and args.grads == "scale":
                    p.grad.mul_(args.scale)
            opt.step()
            opt.zero_grad()
            steps += 1
            if args.step_delay:
                time.sleep(args.step_delay)
    if args.params != "honest":
        with torch.no_grad():
            # What it serves: TrainingStateAverager serves the optimizer's (offloaded) parameters.
            for group in opt.state_averager.optimizer.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan")) if args.params == "nan" else p.mul_(args.scale)
    if args.fake_epoch:
        opt.state_averager.local_epoch = args.fake_epoch
        opt.state_averager.state_sharing_priority = args.fake_epoch
        opt.tracker.report_local_progress(args.fake_epoch, 0)
    write_json(out / "result.json", dict(steps=steps, epoch=opt.local_epoch, finished_at=get_dht_time()))
    deadline = time.monotonic() + args.serve
    while time.monotonic() < deadline:
        time.sleep(0.5)
    opt.shutdown()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
