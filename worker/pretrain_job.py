"""A pretrain assignment: UL2 Mixture-of-Denoisers over hivemind with the round's other workers.

The worker loads the base version, joins the round's hivemind run (``run_id``)
through the coordinator's DHT peer, and trains on MoD batches from its corpus
shard until the swarm reaches the round's epoch count. Gradients are averaged
8-bit and parameters fp16 (:mod:`coldswarm.worker.swarm`), or, with
``"algorithm": "diloco"``, only pseudo-gradients every ``inner_steps`` local
steps (:mod:`coldswarm.worker.diloco`). Nothing is uploaded:
the coordinator's checkpointer downloads the averaged state from the swarm, so
after training the worker stays in the run, serving its state, until the
checkpointer announces it has collected it (or ``serve_state_timeout_s``
passes).

The worker joins the swarm as an admitted peer: the coordinator signs its hivemind identity a short-lived
credential for the round (:mod:`coldswarm.worker.swarm_credentials`), renewed while the job runs; a refused
renewal (revoked token, round over) takes it out of the swarm, and the job fails saying so.

Round options (``PretrainTask.hyperparameters_json``) take the
:class:`~coldswarm.common.round_options.PretrainDataOptions` fields plus any
:class:`SwarmConfig` field (``lr``, ``matchmaking_time``, ``averaging_timeout``,
``grad_compression``, ...); a name that is neither is refused.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from coldswarm.common.round_options import PretrainDataOptions, pretrain_hyperparameters
from coldswarm.lm.batching import mod_batches
from coldswarm.lm.data import resolve_shard
from coldswarm.lm.mod import MoDConfig
from coldswarm.lm.tokenizer import load_tokenizer
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.algorithms import make_trainer
from coldswarm.worker.devices import load_seq2seq
from coldswarm.worker.jobs import Cancelled, JobContext, JobResult
from coldswarm.worker.swarm import SwarmConfig, SwarmProgress, SwarmTrainer
from coldswarm.worker.swarm_credentials import SwarmCredentials

log = logging.getLogger(__name__)


def split_options(task: pb.PretrainTask) -> tuple[PretrainDataOptions, dict]:
    """Data options for this module; everything else goes to :class:`SwarmConfig` (unknown keys refused)."""
    return pretrain_hyperparameters(task.hyperparameters_json, swarm_fields=SwarmConfig.__dataclass_fields__)


def run_pretrain_job(ctx: JobContext, task: pb.PretrainTask) -> JobResult:
    data, swarm_options = split_options(task)
    if not task.initial_peers and not ctx.dht_initial_peers:
        raise ValueError("the pretrain task names no DHT peers to join; the coordinator runs none")
    peers = list(task.initial_peers) or ctx.dht_initial_peers
    overrides = {"initial_peers": peers, "device": ctx.device, "batch_size_per_step": data.batch_size}
    if ctx.swarm_host_maddrs:
        overrides["host_maddrs"] = ctx.swarm_host_maddrs
    if ctx.swarm_announce_maddrs:
        overrides["announce_maddrs"] = ctx.swarm_announce_maddrs
    config = SwarmConfig.from_task(task, swarm_options, **overrides)

    tokenizer = load_tokenizer(ctx.version_dir)
    model = load_seq2seq(ctx.version_dir, ctx.device)
    shard = resolve_shard(task.corpus_shard or "corpus:0-of-1", ctx.data_dir, on_error=ctx.on_bad_record)
    mod = MoDConfig(inputs_length=data.inputs_length, seed=data.seed)
    # Loop over the shard for as long as the swarm trains; each pass draws fresh masks.
    batches = (b for epoch in itertools.count() for b in mod_batches(shard, tokenizer, data.batch_size, mod))
    log.info("pretrain run %s: %s, %d peers to join", task.run_id, shard.description, len(peers))

    ctx.progress.update(phase="training", step=0, total_steps=0)
    last_log = [0.0]

    def on_progress(p: SwarmProgress) -> None:
        ctx.progress.update(
            step=p.step,
            loss=p.loss,
            samples_per_s=p.samples_per_s,
            metrics={"epoch": float(p.epoch), "swarm_peers": float(p.swarm_peers)},
        )
        if time.monotonic() - last_log[0] > 10:
            last_log[0] = time.monotonic()
            log.info(
                "step %d epoch %d/%s loss %.3f, %d peer(s), %.1f samples/s",
                p.step,
                p.epoch,
                task.epochs or "-",
                p.loss_avg,
                p.swarm_peers,
                p.samples_per_s,
            )

    # Admission: the coordinator signs this worker's hivemind identity a short-lived credential for the round;
    # without one no peer of the swarm answers it. Renewed in the background while the job runs.
    if ctx.swarm_credential is None or ctx.swarm_identity_path is None:
        raise ValueError("a pretrain job needs a swarm credential from the coordinator (GetSwarmCredential)")
    credentials = SwarmCredentials(
        ctx.swarm_credential, ctx.swarm_identity_path, ctx.scratch_dir / "swarm.credential", task.run_id
    )
    security = credentials.obtain()
    log.info("admitted to run %s's swarm until %.0f", task.run_id, credentials.expires_at)
    try:
        with make_trainer(model, config, on_progress=on_progress, security=security) as trainer:
            # Out of the swarm (credential expired unrenewed): stop training, and serving too.
            leave = threading.Event()
            threading.Thread(target=lambda: (ctx.stopping.wait(), leave.set()), daemon=True).start()
            credentials.start(
                on_renewed=trainer.publish_credential, on_lost=lambda: (leave.set(), trainer.stop())
            )
            result, collected = _train_and_serve(ctx, task, data, trainer, batches, credentials, leave)
    finally:
        credentials.stop()
    metrics = {f"swarm_{k}": v for k, v in result.as_metrics().items()}
    metrics.update({f"diloco_{k}": v for k, v in getattr(trainer, "diloco_stats", {}).items()})
    metrics["collected"] = float(collected)
    return JobResult(num_examples=result.samples, metrics=metrics)


def _train_and_serve(ctx: JobContext, task, data, trainer: SwarmTrainer, batches, credentials, leave):
    """Train until the swarm is done, then serve the state until the checkpointer collected it (or ``leave``)."""
    stop_watch = threading.Thread(target=lambda: (ctx.cancel.wait(), trainer.stop()), daemon=True)
    stop_watch.start()
    result = trainer.train(batches)
    if credentials.lost:
        raise RuntimeError(f"left run {task.run_id}'s swarm at epoch {result.epoch}: {credentials.lost}")
    if result.reason == "stopped" and (ctx.stopping.is_set() or result.epoch == 0):
        raise Cancelled(f"stopped at local step {result.steps} (epoch {result.epoch})")
    if result.reason == "stopped":
        # The coordinator closed the round early (admin or deadline): what the swarm has is its result.
        log.info("round closed at epoch %d: serving the swarm's state to the checkpointer", result.epoch)
    ctx.progress.update(phase="serving_state")
    collected = trainer.serve_state(timeout=data.serve_state_timeout_s, until=leave)
    if not collected and not ctx.stopping.is_set():
        log.warning(
            "the checkpointer did not collect run %s (the round ended without it, or %.0fs passed)",
            task.run_id,
            data.serve_state_timeout_s,
        )
    return result, collected
