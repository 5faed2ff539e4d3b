"""Collaborative training over hivemind: what a worker runs for a pretrain assignment.

A pretrain round is one hivemind *run* (``run_id``): every worker joins the same DHT (bootstrapped by the
coordinator, whose multiaddrs come as ``initial_peers``), trains its copy of the base model on its own corpus
shard, and ``hivemind.Optimizer`` keeps the copies identical:

* each peer accumulates gradients until the whole swarm has processed ``target_batch_size`` samples (one
  *epoch* in hivemind's terms, i.e. one global optimizer step);
* the peers then all-reduce their gradients, compressed to 8 bits, and all apply the same optimizer step
  (synchronous data parallelism, ``use_local_updates=False``);
* after each epoch the parameters are also averaged (fp16 by default), which removes the small drift that
  lossy gradient compression and dropped rounds cause;
* a peer that joins late (or falls behind) downloads parameters and optimizer state from the peer with the
  newest epoch (``load_state_from_peers``) before it contributes;
* a peer that disappears costs the others at most ``averaging_timeout`` (they proceed with the gradients they
  have) and its progress record expires after ``peer_expiration`` seconds.

Usage (what the worker daemon does)::

    from coldswarm.worker.swarm import SwarmConfig, SwarmTrainer

    config = SwarmConfig(run_id=task.run_id, initial_peers=list(task.initial_peers),
                         target_batch_size=task.target_batch_size, batch_size_per_step=8,
                         max_epochs=task.epochs, lr=3e-4)
    with SwarmTrainer(model, config, on_progress=heartbeat) as trainer:   # joins the DHT, syncs state
        signal.signal(signal.SIGTERM, lambda *_: trainer.stop())          # stops at the next step boundary
        result = trainer.train(batches)        # batches: iterable of dicts (input_ids, attention_mask, labels)
        trainer.serve_state(timeout=120)       # let the coordinator's checkpointer download the final state
    # leaving the `with` block shuts the peer down cleanly (says goodbye, releases ports)

The coordinator side (bootstrap DHT peer + checkpointer) is the coordinator's ``checkpointer`` module. The
two speak the protocol in :mod:`coldswarm.swarm`: which tensors are trained and in what order
(:func:`~coldswarm.swarm.parameters.swarm_parameters`), the DHT keys and their typed records
(:mod:`coldswarm.swarm.records`), and the averaging codecs. The optimizer and its schedule are built in
:mod:`coldswarm.worker.optimizers`.

Tuning
------
* ``target_batch_size``: samples per global step for the *whole swarm*. Larger means fewer averaging rounds
  per sample (less communication) and more peers tolerated; aim for every peer to spend at least ~10x
  ``matchmaking_time`` computing between rounds. The learning rate is a function of it, not of the peer count.
* ``matchmaking_time``: how long peers wait to form an averaging group. 2-5 s on a LAN, 10-15 s over the
  internet. Must exceed ``request_timeout`` (hivemind warns about deadlocks otherwise; checked here).
* ``averaging_timeout``: give up on a round (and use local gradients) after this long; ~2x the time an
  all-reduce actually takes. It bounds how long a vanished peer can stall the others.
* ``grad_compression`` / ``state_compression``: see :mod:`coldswarm.swarm.averaging_codecs` (8-bit gradients
  and fp16 state by default; ``size_threshold`` keeps small tensors in fp16).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch

from coldswarm.common.options import refuse_unknown
from coldswarm.swarm.averaging_codecs import make_compression, register_safe_codecs
from coldswarm.swarm.credentials import owner_marker
from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.guarded_averagers import AveragerGuard
from coldswarm.swarm.parameters import swarm_parameters
from coldswarm.swarm.records import (
    ENDED_UNCOLLECTED,
    collected_epoch,
    collected_key,
    metrics_key,
    metrics_record,
    run_validators,
)
from coldswarm.swarm.robust import AGGREGATORS, RobustAggregation
from coldswarm.swarm.security import PeerSecurity
from coldswarm.swarm.sigint import preserve_sigint
from coldswarm.worker.optimizers import optimizer_factory, scheduler_factory

logger = logging.getLogger(__name__)

__all__ = ["SwarmConfig", "SwarmProgress", "SwarmResult", "SwarmTrainer"]


@dataclass
class SwarmConfig:
    """How a worker joins and trains in one hivemind run. Fields map to PretrainTask and its hyperparameters."""

    run_id: str = field(
        metadata={"help": "names the hivemind run (one per pretrain round); a DHT key prefix"}
    )
    initial_peers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "multiaddrs of DHT peers to bootstrap from (the coordinator's); empty: start a new DHT"
        },
    )
    target_batch_size: int = field(
        default=256,
        metadata={"help": "samples the whole swarm accumulates per global optimizer step (epoch)"},
    )
    batch_size_per_step: int | None = field(
        default=None,
        metadata={"help": "samples per local step; None: read from each batch's first dimension"},
    )
    lr: float = field(default=3e-4, metadata={"help": "learning rate (for target_batch_size, not per peer)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adam | sgd | adafactor"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (adamw)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum"})
    warmup_epochs: int = field(
        default=0, metadata={"help": "linear learning-rate warm-up over this many global epochs"}
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "clip the *averaged* gradient to this norm before each global step"}
    )
    max_epochs: int | None = field(
        default=None, metadata={"help": "stop once the swarm reaches this global epoch (PretrainTask.epochs)"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many local steps"})
    matchmaking_time: float = field(
        default=5.0, metadata={"help": "seconds to wait for peers when forming an averaging group"}
    )
    averaging_timeout: float = field(
        default=30.0,
        metadata={"help": "abandon an averaging round after this many seconds (use local grads)"},
    )
    request_timeout: float = field(
        default=3.0, metadata={"help": "timeout for one matchmaking request; must be < matchmaking_time"}
    )
    load_state_timeout: float = field(
        default=120.0, metadata={"help": "give up downloading state from a peer after this many seconds"}
    )
    average_state_every: int = field(
        default=1, metadata={"help": "average parameters (state) every this many epochs; 0 disables"}
    )
    peer_expiration: float = field(
        default=30.0,
        metadata={
            "help": "a peer's progress record lives this long on the DHT; bounds how long a dead peer counts"
        },
    )
    grad_compression: str = field(
        default="uniform8bit",
        metadata={
            "help": "codec of the gradient (sync) or pseudo-gradient (diloco) all-reduce "
            "(swarm.averaging_codecs.AVERAGING_CODECS)"
        },
    )
    state_compression: str = field(default="fp16", metadata={"help": "codec for parameter averaging"})
    load_state_compression: str = field(
        default="none",
        metadata={"help": "codec for state downloads (late joiners, checkpointer); none = exact"},
    )
    size_threshold: int = field(
        default=2**12, metadata={"help": "tensors with fewer values than this are sent fp16 instead of 8-bit"}
    )
    host_maddrs: list[str] = field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        metadata={"help": "multiaddrs to listen on; ['/ip4/127.0.0.1/tcp/0'] for loopback only"},
    )
    announce_maddrs: list[str] = field(
        default_factory=list, metadata={"help": "multiaddrs other peers should dial (public IP behind NAT)"}
    )
    client_mode: bool = field(
        default=False,
        metadata={"help": "behind a firewall: dial out only (cannot serve state or reduce parts for others)"},
    )
    device: str = field(default="cpu", metadata={"help": "where the model computes: cpu | cuda | cuda:N"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for forward/backward on CUDA"})
    metrics_period: float = field(
        default=5.0, metadata={"help": "publish this peer's metrics every N seconds"}
    )
    verbose: bool = field(default=False, metadata={"help": "hivemind logs each averaging event at INFO"})
    aggregator: str = field(
        default="centered_clip",
        metadata={"help": "how each reducer aggregates the parts it receives (swarm.robust.AGGREGATORS)"},
    )
    max_state_jump: float = field(
        default=0.5,
        metadata={
            "help": "refuse a downloaded state whose parameters moved more than this (relative L2) from this "
            "peer's own (the checkpointer: from the round's base); 0 disables"
        },
    )
    algorithm: str = field(
        default="sync",
        metadata={"help": "sync | diloco: how the swarm trains together (see worker.algorithms.ALGORITHMS)"},
    )
    inner_steps: int = field(
        default=500, metadata={"help": "diloco: local optimizer steps per peer between syncs (H)"}
    )
    outer_lr: float = field(default=0.7, metadata={"help": "diloco: learning rate of the outer Nesterov SGD"})
    outer_momentum: float = field(
        default=0.9, metadata={"help": "diloco: momentum of the outer Nesterov SGD"}
    )
    overlap: bool = field(
        default=True,
        metadata={"help": "diloco: run each sync while the next inner steps train (False: block on it)"},
    )

    def __post_init__(self):
        from coldswarm.worker.algorithms import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        if self.inner_steps < 1 or self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ValueError("inner_steps must be >= 1, outer_lr > 0 and outer_momentum in [0, 1)")
        if self.matchmaking_time <= self.request_timeout:
            raise ValueError(
                f"matchmaking_time ({self.matchmaking_time}) must exceed request_timeout ({self.request_timeout}): "
                "hivemind can deadlock matchmaking otherwise"
            )
        if self.averaging_timeout <= self.matchmaking_time:
            raise ValueError("averaging_timeout must exceed matchmaking_time")
        if self.target_batch_size <= 0:
            raise ValueError("target_batch_size must be positive")
        if "." in self.run_id or not self.run_id:
            raise ValueError("run_id must be a non-empty string without '.' (it prefixes DHT keys)")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose one of {sorted(AGGREGATORS)}")
        if not self.max_state_jump >= 0:
            raise ValueError("max_state_jump must be >= 0 (0 disables the check)")

    @classmethod
    def from_task(cls, task, hyperparameters: Mapping | None = None, **overrides) -> SwarmConfig:
        """Build from a ``PretrainTask`` message (run_id, initial_peers, target_batch_size, epochs) plus its
        ``hyperparameters_json`` already parsed (keys named like this class's fields; unknown keys raise)."""
        kwargs = dict(
            run_id=task.run_id,
            initial_peers=list(task.initial_peers),
            target_batch_size=int(task.target_batch_size) or 256,
            max_epochs=int(task.epochs) or None,
        )
        hyperparameters = dict(hyperparameters or {})
        refuse_unknown(hyperparameters, cls.__dataclass_fields__, "pretrain hyperparameter(s)")
        for key, value in hyperparameters.items():
            kwargs[key] = tuple(value) if key == "betas" else value
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass
class SwarmProgress:
    """What the progress hook receives after every local step (cheap to build; rate-limit it yourself)."""

    step: int  # local steps taken by this peer
    epoch: int  # this peer's hivemind epoch (global optimizer steps the swarm has taken)
    loss: float  # this step's loss
    loss_avg: float  # mean loss over the last 50 steps
    samples: int  # samples this peer processed in total
    samples_per_s: float  # this peer's throughput since training began
    swarm_peers: int  # peers the progress tracker sees (including this one)
    swarm_samples: int  # samples the swarm accumulated towards the next global step
    target_batch_size: int
    local_fallbacks: int  # global steps this peer took with only its own gradients while others were present

    def as_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass
class SwarmResult:
    """What :meth:`SwarmTrainer.train` returns."""

    steps: int
    samples: int
    epoch: int  # this peer's epoch at the end
    loss: float  # mean loss over the last 50 steps (nan if no step)
    seconds: float
    samples_per_s: float
    local_fallbacks: int  # see SwarmProgress.local_fallbacks
    reason: str  # "max_epochs" | "max_steps" | "exhausted" | "stopped"
    #: what this peer's averagers refused: callers without a credential, received parts, reducers' results,
    #: downloaded states (GuardedAveragerMixin.guard_stats, summed over both averagers)
    refusals: dict[str, int] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        metrics = {k: float(v) for k, v in asdict(self).items() if k not in ("reason", "refusals")}
        metrics.update({f"refused_{k}": float(v) for k, v in self.refusals.items()})
        return metrics


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot infer the batch size: the batch holds no tensor with a batch dimension")


def _default_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


class SwarmTrainer:
    """Trains ``model`` together with the other peers of ``config.run_id``.

    :param model: any torch module; for HF seq2seq models the default ``loss_fn`` calls ``model(**batch).loss``.
      It is trained in place (on ``config.device``); after :meth:`train` it holds the swarm's parameters.
    :param config: :class:`SwarmConfig`.
    :param on_progress: called with a :class:`SwarmProgress` after every local step (from the training thread).
    :param loss_fn: ``(model, batch) -> scalar loss`` to override the default.
    :param dht: an already running ``hivemind.DHT`` to use instead of starting one (not shut down by us).
    :param grad_compression: a hivemind ``CompressionBase`` to use instead of ``config.grad_compression``
      (``benchmarks/swarm.py`` wraps one in ``ByteCountingCompression``).
    :param security: this peer's identity, the coordinator's public key and its credential
      (:class:`~coldswarm.swarm.security.PeerSecurity`): the DHT then speaks only with admitted peers, records
      are signed and checked, and the averagers serve only admitted callers. None: an *open* swarm, anyone
      may join (benchmarks and private experiments; the worker daemon always passes one). A ``dht`` passed
      in must have been started with ``security.dht_kwargs()``.
    :param guard: use the guarded averagers (:mod:`coldswarm.swarm.guarded_averagers`: finite parts only,
      ``config.aggregator``, screened results, checked state downloads). False: hivemind's own, unguarded
      (the benchmark's baseline).
    :param state_compression: the same for ``config.state_compression`` (parameter averaging).

    Life cycle: :meth:`start` (or ``with``) joins the DHT and syncs with the swarm; :meth:`train` runs until
    a stop condition; :meth:`serve_state` keeps serving downloads for the checkpointer; :meth:`shutdown`.
    :meth:`stop` may be called from any thread or a signal handler; training stops at the next step boundary,
    discarding gradients accumulated towards an unfinished global step (nothing partial is ever applied).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: SwarmConfig,
        *,
        on_progress: Callable[[SwarmProgress], None] | None = None,
        loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
        dht=None,
        grad_compression=None,
        security: PeerSecurity | None = None,
        guard: bool = True,
        state_compression=None,
    ):
        self.model = model
        self.config = config
        self.security = security
        self.guard = guard
        self.on_progress = on_progress
        self.loss_fn = loss_fn or _default_loss
        self.dht = dht
        self._own_dht = dht is None
        self._grad_compression = grad_compression
        self._state_compression = state_compression
        self.optimizer = None  # hivemind.Optimizer once started
        self._stop = threading.Event()
        self._steps = 0
        self._samples = 0
        self._losses: collections.deque[float] = collections.deque(maxlen=50)
        self._last_metrics_time = -math.inf
        self._train_seconds = 0.0
        self.loaded_state_from_peers = False
        self.local_fallbacks = 0  # global steps taken with local gradients although other peers were present
        self._diverged_epoch = None

    # -- life cycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> SwarmTrainer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> SwarmTrainer:
        """Join the DHT, create the hivemind optimizer, and download the swarm's state if it is ahead of us."""
        from hivemind.utils.crypto import RSAPrivateKey

        if self.optimizer is not None:
            return self
        cfg = self.config
        register_safe_codecs()  # before the averagers fork their processes
        self.model.to(cfg.device)
        security = self.security
        # The key this peer signs its records with: its identity with security on, a fresh one in an open swarm.
        self._signing_key = security.private_key if security is not None else RSAPrivateKey()
        if self.dht is None:
            if security is not None:
                kwargs = security.dht_kwargs()
            else:
                from hivemind.dht.crypto import RSASignatureValidator

                kwargs = dict(record_validators=[RSASignatureValidator(self._signing_key)])
            self.dht = start_dht(
                cfg.initial_peers, cfg.host_maddrs, cfg.announce_maddrs, cfg.client_mode, **kwargs
            )
        # This peer stores only well-formed, signed, authorised run records.
        self.dht.add_validators(
            run_validators(cfg.run_id, security.authority_public_key if security else None)
        )
        if security is not None and not security.publish_credential(self.dht, cfg.run_id):
            raise RuntimeError("could not publish this peer's swarm credential on the DHT")
        params = [param for _, param in swarm_parameters(self.model)]
        with preserve_sigint():
            self.optimizer = self._make_optimizer(params)
        self._watch_local_fallbacks(self.optimizer)
        self.sync_with_swarm()
        return self

    def _averager_guard(self, max_state_jump: float | None) -> AveragerGuard:
        cfg = self.config
        return AveragerGuard(
            admitted=self.security.admitted(cfg.run_id) if self.security is not None else None,
            aggregation=RobustAggregation(aggregator=cfg.aggregator),
            max_state_jump=max_state_jump or None,
        )

    def _make_optimizer(self, params):
        from hivemind import Optimizer
        from hivemind.optim.grad_averager import GradientAverager

        from coldswarm.swarm.guarded_averagers import GuardedGradientAverager, GuardedTrainingStateAverager

        cfg = self.config
        grad_averager = GradientAverager
        optimizer_class = Optimizer
        if self.guard:
            grad_averager = functools.partial(GuardedGradientAverager, guard=self._averager_guard(None))
            state_guard = self._averager_guard(cfg.max_state_jump)

            class GuardedOptimizer(Optimizer):  # hivemind.Optimizer takes no factory for its state averager
                def _make_state_averager(self, **kwargs):
                    return GuardedTrainingStateAverager(
                        guard=state_guard,
                        dht=self.dht,
                        prefix=f"{self.run_id}_state_averager",
                        min_matchmaking_time=self.matchmaking_time,
                        allreduce_timeout=self.allreduce_timeout,
                        shutdown_timeout=self.shutdown_timeout,
                        offload_optimizer=self.offload_optimizer,
                        custom_gradients=self.offload_optimizer,
                        status_loglevel=self.status_loglevel,
                        next_chunk_timeout=self.next_chunk_timeout,
                        client_mode=self.client_mode,
                        auxiliary=self.auxiliary,
                        start=True,
                        **kwargs,
                    )

            optimizer_class = GuardedOptimizer
        return optimizer_class(
            dht=self.dht,
            run_id=cfg.run_id,
            target_batch_size=cfg.target_batch_size,
            batch_size_per_step=cfg.batch_size_per_step,
            params=params,
            optimizer=optimizer_factory(cfg),
            scheduler=scheduler_factory(cfg),
            matchmaking_time=cfg.matchmaking_time,
            averaging_timeout=cfg.averaging_timeout,
            load_state_timeout=cfg.load_state_timeout,
            # Synchronous data parallelism: accumulate to target_batch_size, all-reduce gradients, same step.
            use_local_updates=False,
            average_state_every=cfg.average_state_every or 10**9,
            offload_optimizer=True,
            client_mode=cfg.client_mode,
            grad_compression=self._grad_compression
            or make_compression(cfg.grad_compression, cfg.size_threshold),
            state_averaging_compression=self._state_compression
            or make_compression(cfg.state_compression, cfg.size_threshold),
            load_state_compression=make_compression(cfg.load_state_compression, cfg.size_threshold),
            # hivemind 1.1.12 forwards averager_opts to the state averager only (despite its docstring): the
            # gradient averager would keep the 3 s default request_timeout, so give it its own factory.
            averager_opts=dict(request_timeout=cfg.request_timeout),
            grad_averager_factory=functools.partial(grad_averager, request_timeout=cfg.request_timeout),
            # The progress records are signed with the same key as ours (the DHT's one signature validator).
            tracker_opts=dict(metadata_expiration=cfg.peer_expiration, private_key=self._signing_key),
            verbose=cfg.verbose,
        )

    def _watch_local_fallbacks(self, opt) -> None:
        # hivemind falls back to this peer's own gradients when a gradient all-reduce fails (timeout, group
        # not found: typically a peer that arrived or fell behind just as the others averaged). Its parameters
        # then differ from the swarm's until the next state averaging. Count it (a health metric: hivemind
        # suggests raising averaging_timeout when it happens on >= 25% of epochs) and, for this epoch, rank our
        # state below the peers that did average, so late joiners and the checkpointer download theirs.
        fall_back = opt._load_local_gradients_into_optimizer

        def counting_fall_back():
            if opt.tracker.global_progress.num_peers > 1:
                self.local_fallbacks += 1
                self._diverged_epoch = opt.local_epoch + 1  # the epoch this step is about to enter
            return fall_back()

        opt._load_local_gradients_into_optimizer = counting_fall_back

    def sync_with_swarm(self) -> bool:
        """Download parameters and optimizer state from the most advanced peer if the swarm is ahead of us
        (a late joiner). Returns whether state was loaded. hivemind also does this by itself inside ``step``
        when it notices it fell behind; doing it up front means the first batches are not wasted."""
        opt = self._require_started()
        global_epoch = opt.tracker.global_progress.epoch
        if global_epoch > opt.local_epoch:
            logger.info(
                "swarm %s is at epoch %d, we are at %d: loading state from peers",
                self.config.run_id,
                global_epoch,
                opt.local_epoch,
            )
            opt.load_state_from_peers()
            self.loaded_state_from_peers = True
        return self.loaded_state_from_peers

    def publish_credential(self) -> bool:
        """Publish this peer's current credential again (after its renewal), so that other peers' averagers keep
        admitting it; False in an open swarm or when it could not be stored."""
        if self.security is None or self.dht is None:
            return False
        return self.security.publish_credential(self.dht, self.config.run_id)

    def guard_stats(self) -> dict[str, int]:
        """What this peer's guarded averagers refused so far (callers, parts, results, states); empty unguarded."""
        totals: dict[str, int] = {}
        if self.optimizer is not None:
            # hivemind.Optimizer's two averagers; DiLoCo's state averager and pseudo-gradient ``averager``.
            for name in ("state_averager", "grad_averager", "averager"):
                stats = getattr(getattr(self.optimizer, name, None), "guard_stats", None)
                for key, value in (stats() if stats else {}).items():
                    totals[key] = totals.get(key, 0) + value
        return totals

    def stop(self) -> None:
        """Ask :meth:`train` to return at the next step boundary (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def epoch(self) -> int:
        return self._require_started().local_epoch

    @property
    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other peers can bootstrap from (useful when this peer started a new DHT)."""
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id)

    def shutdown(self) -> None:
        """Leave the swarm: cancel/finish in-flight averaging rounds, stop the averagers and our DHT."""
        if self.optimizer is not None:
            try:
                self._publish_metrics(force=True)
                self.optimizer.shutdown()
            finally:
                self.optimizer = None
        if self.dht is not None and self._own_dht:
            self.dht.shutdown()
            self.dht = None

    # -- training -----------------------------------------------------------------------------------------

    def train(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> SwarmResult:
        """Train on ``batches`` (dicts of tensors, moved to ``config.device``) until the swarm reaches
        ``max_epochs``, this peer took ``max_steps``, the batches run out, or :meth:`stop` is called."""
        opt = self._require_started()
        cfg = self.config
        reason = "exhausted"
        self.model.train()
        began = time.perf_counter()
        try:
            for batch in batches:
                if self._stop.is_set():
                    reason = "stopped"
                    break
                if cfg.max_epochs is not None and opt.local_epoch >= cfg.max_epochs:
                    reason = "max_epochs"
                    break
                if cfg.max_steps is not None and self._steps >= cfg.max_steps:
                    reason = "max_steps"
                    break
                self._step(opt, batch)
            else:
                if cfg.max_epochs is not None and opt.local_epoch >= cfg.max_epochs:
                    reason = "max_epochs"
        finally:
            self._train_seconds += time.perf_counter() - began
            self.finish_pending()
            self._publish_metrics(force=True)
        return SwarmResult(
            steps=self._steps,
            samples=self._samples,
            epoch=opt.local_epoch,
            loss=self._mean_loss(),
            seconds=self._train_seconds,
            samples_per_s=self._samples / max(self._train_seconds, 1e-9),
            local_fallbacks=self.local_fallbacks,
            reason=reason,
            refusals=self.guard_stats(),
        )

    def _step(self, opt, batch: Mapping[str, torch.Tensor]) -> None:
        cfg = self.config
        batch = {
            k: (v.to(cfg.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
        }
        batch_size = cfg.batch_size_per_step or _batch_size(batch)
        use_bf16 = cfg.bf16 and torch.device(cfg.device).type == "cuda"
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        opt.step(batch_size=batch_size)
        opt.zero_grad()
        if (
            self._diverged_epoch is not None
            and opt.local_epoch == self._diverged_epoch
            and not cfg.client_mode
        ):
            # hivemind sets the priority to local_epoch at each epoch; sit just below peers that averaged.
            opt.state_averager.state_sharing_priority = opt.local_epoch - 0.5
            self._diverged_epoch = None
        self._steps += 1
        self._samples += batch_size
        self._losses.append(float(loss.detach()))
        self._publish_metrics()
        if self.on_progress is not None:
            self.on_progress(self.progress(loss=self._losses[-1]))

    def progress(self, loss: float = math.nan) -> SwarmProgress:
        """A snapshot of this peer's and the swarm's progress."""
        opt = self._require_started()
        global_progress = opt.tracker.global_progress
        return SwarmProgress(
            step=self._steps,
            epoch=opt.local_epoch,
            loss=loss,
            loss_avg=self._mean_loss(),
            samples=self._samples,
            samples_per_s=opt.tracker.performance_ema.samples_per_second,
            swarm_peers=max(int(global_progress.num_peers), 1),
            swarm_samples=int(global_progress.samples_accumulated),
            target_batch_size=self.config.target_batch_size,
            local_fallbacks=self.local_fallbacks,
        )

    def finish_pending(self) -> None:
        """Wait for background averaging (the last epoch's parameter averaging) and apply its result, so the
        model holds the swarm's parameters."""
        if self.optimizer is not None:
            self.optimizer.state_averager.step(wait_for_delayed_updates=True)

    def serve_state(self, timeout: float, poll: float = 1.0, until: threading.Event | None = None) -> bool:
        """Stay in the swarm so others (the coordinator's checkpointer, late joiners) can download our state,
        until the checkpointer announces it collected this round (returns True) or that the round ended
        without a collection (False), or ``timeout`` passes (False), or ``until`` is set (default: :meth:`stop`
        was called; pass another event to serve after a stop)."""
        self._require_started()
        until = self._stop if until is None else until
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until.is_set():
            found = self.dht.get(collected_key(self.config.run_id), latest=True)
            collected = collected_epoch(found, self.security.authority_public_key if self.security else None)
            if collected is not None:
                return collected != ENDED_UNCOLLECTED
            until.wait(poll)
        return False

    # -- metrics on the DHT -------------------------------------------------------------------------------

    def _publish_metrics(self, force: bool = False) -> None:
        """Publish this peer's :class:`~coldswarm.swarm.records.PeerMetrics` under metrics_key(run_id) so the
        checkpointer can report the swarm's loss and samples. Non-blocking unless ``force``; a record outlives
        the peer (1 h) so a round's totals count peers that left."""
        if self.optimizer is None or self.dht is None:
            return
        now = time.monotonic()
        if not force and now - self._last_metrics_time < self.config.metrics_period:
            return
        self._last_metrics_time = now
        from hivemind.utils import get_dht_time

        value = metrics_record(
            epoch=self.optimizer.local_epoch,
            steps=self._steps,
            samples=self._samples,
            loss=self._mean_loss(),
            samples_per_s=self.optimizer.tracker.performance_ema.samples_per_second,
            time=get_dht_time(),
        )
        stored = self.dht.store(
            metrics_key(self.config.run_id),
            subkey=owner_marker(self._signing_key.get_public_key().to_bytes()),  # signed by us, ours only
            value=value,
            expiration_time=get_dht_time() + 3600,
            return_future=True,
        )
        if force:
            # A forced publish is this peer's last word (end of training, leaving): wait for it, or the
            # round's totals may miss the final steps of a peer that exits right after.
            try:
                stored.result(timeout=self.config.request_timeout * 3)
            except Exception as exc:  # noqa: BLE001 - metrics are best effort; training results are not
                logger.debug("final metrics not stored: %r", exc)

    def _mean_loss(self) -> float:
        return sum(self._losses) / len(self._losses) if self._losses else math.nan

    def _require_started(self):
        if self.optimizer is None:
            raise RuntimeError("SwarmTrainer is not started: call start() or use it as a context manager")
        return self.optimizer
