"""A DiLoCo swarm peer for the multi-process tests: ``python tests/worker/diloco_peer.py --run-id R --out DIR ...``.

The tiny T5 and random batches of ``swarm_peer.py``, trained with ``algorithm="diloco"``
(:class:`coldswarm.worker.diloco.DiLoCoTrainer`). Writes into ``--out``:

* ``ready.json`` once joined (and after any state download): epoch, loaded_state_from_peers, peer_id;
* ``joined.safetensors`` the model's parameters right after joining, ``joined_outer.safetensors`` the outer
  state then (``theta.<name>`` and ``momentum.<name>``);
* ``outer<k>.safetensors`` the outer state each time this peer enters outer epoch k (after joining);
* ``final.safetensors`` (model) and ``result.json`` (with the sync figures) after training;
then keeps serving its state (``--serve``) until the checkpointer announces collection or it is killed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from swarm_peer import batches, params_of, tiny_t5, wait_for_file, write_json, write_tensors  # noqa: E402

from coldswarm.swarm.authorizer import CredentialFile  # noqa: E402
from coldswarm.swarm.parameters import swarm_parameters  # noqa: E402
from coldswarm.swarm.security import PeerSecurity  # noqa: E402
from coldswarm.worker.algorithms import make_trainer  # noqa: E402
from coldswarm.worker.swarm import SwarmConfig  # noqa: E402


def outer_state(trainer, model) -> dict[str, torch.Tensor]:
    """The outer parameters and Nesterov momentum buffers this peer serves, by parameter name."""
    opt = trainer.optimizer
    names = [name for name, _ in swarm_parameters(model)]
    sgd = opt.state_averager.optimizer
    state = {}
    for name, theta in zip(names, opt.outer_params, strict=True):
        state[f"theta.{name}"] = theta.detach().clone().contiguous()
        state[f"momentum.{name}"] = sgd.state[theta]["momentum_buffer"].detach().clone().contiguous()
    return state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--initial-peers", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=6)
    ap.add_argument("--max-epochs", type=int, default=1, help="0: no limit")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--grad-compression", default="none")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--matchmaking-time", type=float, default=5.0)
    ap.add_argument("--averaging-timeout", type=float, default=30.0)
    ap.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (slows this peer)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--stop-file", default="", help="stop at the next step boundary once this file exists")
    ap.add_argument("--join-file", default="", help="import and build everything, then join once this exists")
    ap.add_argument("--wait-file", default="", help="after joining, wait for this file before training")
    ap.add_argument("--serve", type=float, default=0.0, help="serve state this many seconds after training")
    ap.add_argument("--identity", default="", help="this peer's identity key file (swarm_peer.admit())")
    ap.add_argument("--credential", default="", help="its credential file")
    ap.add_argument("--authority", default="", help="the authority's public key file")
    ap.add_argument("--aggregator", default="centered_clip")
    ap.add_argument("--max-state-jump", type=float, default=0.5)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_t5(args.model_seed)
    config = SwarmConfig(
        run_id=args.run_id,
        initial_peers=[p for p in args.initial_peers.split(",") if p],
        algorithm="diloco",
        inner_steps=args.inner_steps,
        optimizer="adamw",
        lr=args.lr,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        overlap=not args.no_overlap,
        batch_size_per_step=args.batch_size,
        max_epochs=args.max_epochs or None,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        request_timeout=min(3.0, args.matchmaking_time / 2),
        grad_compression=args.grad_compression,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        peer_expiration=20.0,
        metrics_period=1.0,
        verbose=args.verbose,
        aggregator=args.aggregator,
        max_state_jump=args.max_state_jump,
    )
    # Admitted as the coordinator admits a worker (a credential for this run): the guarded swarm.
    security = None
    if args.identity:
        security = PeerSecurity(
            args.identity, Path(args.authority).read_bytes(), CredentialFile(args.credential)
        )
    step_log = []  # (unix time, epoch) after each step

    def on_progress(progress):
        step_log.append((time.time(), progress.epoch))
        if args.step_delay:
            time.sleep(args.step_delay)
        if args.stop_file and os.path.exists(args.stop_file):
            trainer.stop()

    wait_for_file(args.join_file)
    trainer = make_trainer(model, config, on_progress=on_progress, security=security)
    with trainer:
        # Snapshot the outer state at every change of outer epoch (several can happen within one step).
        opt = trainer.optimizer
        after_epoch_change = opt._after_epoch_change

        def snapshot_after_epoch_change():
            after_epoch_change()
            write_tensors(out / f"outer{opt.local_epoch}.safetensors", outer_state(trainer, model))

        opt._after_epoch_change = snapshot_after_epoch_change
        # The inner steps each period took before its sync (H, or more while a slower peer finished its H).
        period_steps, launch = [], opt._launch

        def counting_launch():
            period_steps.append(opt.steps_in_period)
            launch()

        opt._launch = counting_launch
        write_tensors(out / "joined.safetensors", params_of(model))
        write_tensors(out / "joined_outer.safetensors", outer_state(trainer, model))
        write_json(
            out / "ready.json",
            dict(
                epoch=trainer.epoch,
                loaded_state_from_peers=trainer.loaded_state_from_peers,
                peer_id=trainer.peer_id,
            ),
        )
        wait_for_file(args.wait_file)
        result = trainer.train(batches(args.data_seed, args.batch_size))
        write_tensors(out / "final.safetensors", params_of(model))
        write_tensors(out / "outer_final.safetensors", outer_state(trainer, model))
        write_json(
            out / "result.json",
            dict(
                steps=result.steps,
                samples=result.samples,
                epoch=result.epoch,
                loss=result.loss,
                reason=result.reason,
                local_fallbacks=result.local_fallbacks,
                seconds=result.seconds,
                stats=trainer.diloco_stats,
                period_steps=period_steps,
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
