"""The coordinator's hivemind side: the swarm's DHT bootstrap peer and its checkpointer.

The coordinator runs one long-lived DHT peer. Its visible multiaddrs are the ``initial_peers`` handed to
workers in every ``PretrainTask``. At the end of a pretrain round the checkpointer downloads the averaged
state from the peer with the newest epoch (hivemind's ``load_state_from_peers``: the same path a late joiner
uses, fp32, exact), puts it into a model of the round's base architecture, and writes an HF directory that
``from_pretrained`` loads, plus the swarm's metrics. It never trains and never takes part in averaging: it
attaches to the run's state averager with state sharing off, so no worker ever downloads from it.

Its DHT peer's identity (``identity_path``) is the swarm's authority (:mod:`coldswarm.swarm.credentials`): the
key that signs the workers' credentials (:attr:`Checkpointer.authority`) and the coordinator-only records. It
downloads only from admitted peers and refuses a state that is not finite or whose parameters moved more than
``max_state_jump`` from the base (the lineage's last defence); it reads who took part from their signed records
(:meth:`Checkpointer.swarm_participants`).

Usage (the round manager)::

    from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig

    ckpt = Checkpointer(CheckpointerConfig(host_maddrs=["/ip4/0.0.0.0/tcp/31337"],
                                           identity_path=data_dir / "dht.key"))
    ckpt.start()
    app = Coordinator(config, dht_peers=ckpt.initial_peers)  # handed to workers (Register, PretrainTask)
    ...                                                      # workers train run_id for `epochs` epochs
    metrics = ckpt.collect(run_id, base_model_dir, out_dir, min_epoch=epochs, timeout=600)
    app.merges.record_version(out_dir, round_id, kind=VersionKind.PRETRAIN, metrics=metrics)
    ckpt.shutdown()                                          # at coordinator exit

``collect`` writes ``out_dir`` through fusion's model-directory writer
(:class:`coldswarm.fusion.checkpoint.ModelDirWriter`, the one merges write with): atomically (a temp dir in the
same parent, fsync, rename), so it either exists complete or not at all. It copies the base directory's
non-weight files (``config.json``, tokenizer, generation config) and writes the weights in the base's layout
(``model.safetensors``, or the base's shards). It does not write the manifest; that is the version store's.

The two sides of the swarm speak the protocol in :mod:`coldswarm.swarm`: which tensors are trained and in what
order (:func:`~coldswarm.swarm.parameters.swarm_parameters`), the DHT keys and their typed records
(:mod:`coldswarm.swarm.records`: the checkpointer reads the peers' metrics through that schema).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from concurrent.futures import TimeoutError as FuturesTimeout  # the builtin's alias from 3.11 only
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coldswarm.fusion.checkpoint import CheckpointReader, ModelDirWriter
from coldswarm.swarm.averagers import state_prefix
from coldswarm.swarm.averaging_codecs import register_safe_codecs
from coldswarm.swarm.credentials import SwarmAuthority
from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.guarded_averagers import AveragerGuard, relative_jump
from coldswarm.swarm.parameters import swarm_parameters
from coldswarm.swarm.records import (
    ENDED_UNCOLLECTED,
    admitted_credentials,
    admitted_key,
    collected_key,
    metrics_key,
    peer_metrics,
)
from coldswarm.swarm.security import PeerSecurity

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "CheckpointerConfig", "CollectError"]


class CollectError(RuntimeError):
    """The swarm's state could not be collected (no peer reachable, wrong architecture, too old an epoch)."""


@dataclass
class CheckpointerConfig:
    """The coordinator's DHT peer. Fields are what ``coldswarm-coordinator serve`` may expose as flags."""

    host_maddrs: list[str] = field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        metadata={"help": "multiaddrs the DHT peer listens on; fix the port so initial_peers stay valid"},
    )
    announce_maddrs: list[str] = field(
        default_factory=list, metadata={"help": "multiaddrs workers should dial (public address behind NAT)"}
    )
    identity_path: Path | None = field(
        default=None,
        metadata={
            "help": "the swarm authority's key (also this peer's identity; made, owner-only, when missing): with "
            "a fixed port keeps the peer id (and initial_peers) and the workers' credentials valid across "
            "restarts. None: a key of this process's own, in a private temporary directory"
        },
    )
    initial_peers: list[str] = field(
        default_factory=list, metadata={"help": "other bootstrap peers to join (several coordinators)"}
    )
    load_state_timeout: float = field(
        default=60.0, metadata={"help": "per-attempt timeout for downloading a peer's state"}
    )
    request_timeout: float = field(default=3.0, metadata={"help": "hivemind RPC timeout"})
    poll_interval: float = field(default=2.0, metadata={"help": "seconds between collection attempts"})
    max_state_jump: float = field(
        default=0.5,
        metadata={
            "help": "refuse a collected state whose parameters moved more than this (relative L2) from the "
            "round's base version; 0 disables"
        },
    )


class Checkpointer:
    """The DHT bootstrap peer plus the checkpointer of pretrain rounds. Not thread-safe: one collect at a time."""

    def __init__(self, config: CheckpointerConfig | None = None):
        self.config = config or CheckpointerConfig()
        self.dht = None
        self.security: PeerSecurity | None = None
        self._own_key_dir: tempfile.TemporaryDirectory | None = None
        self._validated_runs: set[str] = set()
        #: run id -> the participants collect() recorded with that run's state (for the version's manifest)
        self.participants: dict[str, list[dict]] = {}

    def start(self) -> Checkpointer:
        """Start the DHT peer (a background process and its p2p daemon). Idempotent."""
        if self.dht is None:
            cfg = self.config
            identity = cfg.identity_path
            if identity is None:
                self._own_key_dir = tempfile.TemporaryDirectory(prefix="coldswarm-swarm-key-")
                identity = Path(self._own_key_dir.name) / "dht.key"
            Path(identity).parent.mkdir(parents=True, exist_ok=True)
            self.security = PeerSecurity.for_authority(identity)
            self.dht = start_dht(
                cfg.initial_peers, cfg.host_maddrs, cfg.announce_maddrs, **self.security.dht_kwargs()
            )
            logger.info("swarm DHT bootstrap peer at %s", self.initial_peers)
        return self

    def __enter__(self) -> Checkpointer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def initial_peers(self) -> list[str]:
        """The multiaddrs (with /p2p/<peer id>) workers bootstrap from: PretrainTask.initial_peers."""
        self._require_started()
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    @property
    def authority(self) -> SwarmAuthority:
        """The key that signs the swarm's credentials (this peer's own identity)."""
        self._require_started()
        return self.security.credentials.authority

    def shutdown(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
            self._validated_runs.clear()
        if self._own_key_dir is not None:
            self._own_key_dir.cleanup()
            self._own_key_dir = None

    def _validate_run(self, run_id: str) -> None:
        """Make the DHT peer refuse malformed, unsigned or unauthorised records under ``run_id``'s keys."""
        if run_id not in self._validated_runs:
            self.dht.add_validators(self.security.run_validators(run_id))
            self._validated_runs.add(run_id)

    # -- what the swarm reports -------------------------------------------------------------------------

    def swarm_participants(self, run_id: str) -> list[dict]:
        """Who took part in ``run_id``, from their signed records: one entry per admitted peer that published
        metrics (worker id and peer id from its credential, which the authority signed; epoch, steps, samples,
        loss from its record, which only it could write). Records of keys without a credential for the run are
        left out."""
        self._require_started()
        self._validate_run(run_id)
        authority = self.authority.public_key
        credentials = admitted_credentials(self.dht.get(admitted_key(run_id), latest=True), authority, run_id)
        participants = []
        for owner, record in peer_metrics(self.dht.get(metrics_key(run_id), latest=True)):
            credential = credentials.get(owner)
            if credential is None:
                continue
            participants.append(
                {
                    "worker": credential.worker_id,
                    "peer_id": credential.peer_id.to_base58(),
                    "epoch": record.epoch,
                    "steps": record.steps,
                    "samples": record.samples,
                    "loss": record.loss,
                    "samples_per_s": record.samples_per_s,
                }
            )
        return sorted(participants, key=lambda p: (p["worker"], p["peer_id"]))

    def swarm_metrics(self, run_id: str, participants: list[dict] | None = None) -> dict[str, float]:
        """The swarm's totals over its participants (:meth:`swarm_participants`): samples and steps summed over
        every admitted peer that took part (records outlive their peer for an hour), loss averaged over peers
        weighted by their samples, the number of peers, and the newest epoch any peer reported."""
        records = self.swarm_participants(run_id) if participants is None else participants
        samples = sum(r["samples"] for r in records)
        with_loss = [r for r in records if r["loss"] is not None]
        loss_weight = sum(r["samples"] for r in with_loss)
        if with_loss and loss_weight > 0:
            loss = sum(r["loss"] * r["samples"] for r in with_loss) / loss_weight
        elif with_loss:
            loss = sum(r["loss"] for r in with_loss) / len(with_loss)
        else:
            loss = math.nan
        return {
            "swarm_loss": loss,
            "swarm_samples": float(samples),
            "swarm_steps": float(sum(r["steps"] for r in records)),
            "swarm_peers": float(len(records)),
            "swarm_samples_per_s": float(sum(r["samples_per_s"] for r in records)),
            "swarm_epoch_reported": float(max((r["epoch"] for r in records), default=0)),
        }

    # -- collection -------------------------------------------------------------------------------------

    def collect(
        self,
        run_id: str,
        base_model_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        min_epoch: int = 0,
        timeout: float = 300.0,
        max_state_jump: float | None = None,
    ) -> dict[str, float]:
        """Download the swarm's averaged state for ``run_id`` and write it as an HF directory at ``out_dir``.

        :param base_model_dir: the round's base version (HF directory): gives the architecture, the
          non-weight files, and the parameter order (via ``swarm_parameters``) to map tensors to names.
        :param out_dir: must not exist; written atomically.
        :param min_epoch: keep trying until a peer serves a state of at least this epoch (the round's
          ``epochs``), or ``timeout`` passes.
        :param max_state_jump: refuse states whose parameters moved more than this (relative L2) from the base
          (default: the config's; 0 disables). States that are not finite are always refused. A refused state
          is never written; the next peer is asked.
        :returns: metrics: ``epoch`` (of the collected state), ``swarm_loss``, ``swarm_samples``,
          ``swarm_steps``, ``swarm_peers``, ``swarm_samples_per_s``, ``collect_seconds``.
        :raises CollectError: nothing (acceptable) collected in time, or the state does not fit the base
          architecture.
        :raises FileExistsError: ``out_dir`` exists.

        Afterwards it announces the collection under ``collected_key(run_id)`` so workers waiting in
        ``SwarmTrainer.serve_state`` may leave.
        """
        self._require_started()
        self._validate_run(run_id)
        base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} exists; a version directory is written once")
        began = time.monotonic()
        jump = self.config.max_state_jump if max_state_jump is None else max_state_jump
        model, named = _base_model(base_model_dir)
        base = [param.detach().to("cpu", torch.float32).clone() for _, param in named]
        epoch, loaded = self._download_state(run_id, base, min_epoch, began + timeout, jump)
        state = _checked_state(run_id, named, loaded)
        self._check_lineage(run_id, state, base, jump)
        with torch.no_grad():
            for (_, param), tensor in zip(named, state, strict=True):
                param.copy_(tensor.to(param.dtype))
        self._write_version_dir(model, base_model_dir, out_dir)
        participants = self.swarm_participants(run_id)
        self.participants[run_id] = participants
        metrics = {"epoch": float(epoch), **self.swarm_metrics(run_id, participants)}
        metrics["collect_seconds"] = time.monotonic() - began
        self._announce(run_id, epoch)
        logger.info("collected run %s at epoch %d into %s: %s", run_id, epoch, out_dir, metrics)
        return metrics

    def _download_state(
        self, run_id: str, base: list, min_epoch: int, deadline: float, jump
    ) -> tuple[int, list]:
        """The swarm's state (its epoch and tensors) from an admitted peer serving ``run_id`` at ``min_epoch`` or
        later, downloaded into copies of the base's tensors ``base``."""
        register_safe_codecs()
        # A guarded averager under the run's state-averager prefix: it downloads what the workers'
        # TrainingStateAverager serves, from admitted peers only, and refuses a state that is not finite or moved
        # more than `jump` from the base (then asks the next peer). It never steps (never joins an averaging
        # group) and offers no state of its own (allow_state_sharing=False), so it changes nothing in the swarm.
        guard = AveragerGuard(admitted=self.security.admitted(run_id), max_state_jump=jump or None)
        while True:
            averager = _state_downloader_class()(
                [t.clone() for t in base],
                self.dht,
                guard=guard,
                prefix=state_prefix(run_id),
                start=True,
                allow_state_sharing=False,
                request_timeout=self.config.request_timeout,
                next_chunk_timeout=self.config.load_state_timeout,
            )
            try:
                metadata, loaded = self._download(averager, run_id, min_epoch, deadline)
                return int(metadata["epoch"]), loaded
            except _NoDonors:
                # Seen on a heavily loaded machine: a downloader whose every lookup found no state donor for
                # many seconds while the peers served. A fresh one (new process, new DHT handle) is cheap.
                logger.warning(
                    "run %s: no state donor found for a while; starting a fresh downloader", run_id
                )
            finally:
                averager.shutdown()

    def announce_end(self, run_id: str) -> None:
        """Tell the run's peers serving their state that nothing will be collected (the round was cancelled
        or failed), so they leave now instead of at their serving timeout."""
        self._require_started()
        self._validate_run(run_id)
        self._announce(run_id, ENDED_UNCOLLECTED)

    def _announce(self, run_id: str, value: int) -> None:
        """The coordinator-only record under ``collected_key``: signed with the authority's key, under its marker."""
        from hivemind.utils import get_dht_time

        self.dht.store(
            collected_key(run_id),
            subkey=self.security.owner_marker,
            value=value,
            expiration_time=get_dht_time() + 3600,
        )

    @staticmethod
    def _check_lineage(run_id: str, state: list[torch.Tensor], base: list[torch.Tensor], jump: float) -> None:
        """The lineage's last defence: a state that is not finite, or moved more than ``jump`` (relative L2)
        from its parent, never becomes a version (the publication gate, in merge_pipeline, then decides
        whether one that passes is published)."""
        for i, tensor in enumerate(state):
            if not bool(torch.isfinite(tensor).all()):
                raise CollectError(f"run {run_id}: refused the swarm's state: parameter {i} is not finite")
        moved = relative_jump(state, base)
        if jump and moved > jump:
            raise CollectError(
                f"run {run_id}: refused the swarm's state: its parameters moved {moved:.3g} (relative L2) from "
                f"the base version, over the bound {jump:g}"
            )

    def _download(self, averager, run_id: str, min_epoch: int, deadline: float):
        # load_state_from_peers asks the peer with the highest declared priority (= its epoch); peers refresh
        # that declaration every epoch, so retry until one at min_epoch answers.
        best_epoch, attempts, empty = None, 0, 0
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # One download at a time, waited for until the deadline: each chunk has its own timeout (the
            # averager's next_chunk_timeout), and a donor whose whole state takes longer than
            # load_state_timeout is still heard out, not abandoned to a second download beside it.
            pending = averager.load_state_from_peers(
                wait=False, timeout=min(self.config.load_state_timeout, remaining)
            )
            try:
                result = pending.result(timeout=remaining)
            except FuturesTimeout:
                break  # the deadline passed mid-download: a CollectError below
            if result is not None:
                empty = 0
                metadata, loaded = result
                epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
                if isinstance(epoch, int) and epoch >= min_epoch:
                    return metadata, loaded
                best_epoch = epoch if best_epoch is None else max(best_epoch, epoch or 0)
            else:
                empty += 1
                if (
                    empty >= _EMPTY_LOOKUPS_BEFORE_RESTART
                    and deadline - time.monotonic() > 4 * self.config.poll_interval
                ):
                    raise _NoDonors()
            time.sleep(min(self.config.poll_interval, max(0.0, deadline - time.monotonic())))
        try:
            refused = averager.refusals()
        except Exception:  # the averager's process is gone: the message goes without its reasons
            refused = []
        raise CollectError(
            f"run {run_id}: no peer served an acceptable state of epoch >= {min_epoch} in time "
            f"({attempts} attempts; newest epoch seen: {best_epoch})"
            + (f"; refused: {'; '.join(refused[-3:])}" if refused else "")
        )

    @staticmethod
    def _write_version_dir(model, base_model_dir: Path, out_dir: Path) -> None:
        """Write ``model``'s weights in the base's layout (its files, its tensor names) into ``out_dir`` with the
        base's non-weight files, atomically: fusion's writer decides which files are weights and how a model
        directory appears (the same as a merge's)."""
        state = model.state_dict()
        with CheckpointReader(base_model_dir) as base:
            layout = base.layout()
        missing = [name for names in layout.values() for name in names if name not in state]
        if missing:
            raise CollectError(f"the base checkpoint has tensors the model does not: {missing[:5]}")
        specs = {
            fname: {name: (state[name].dtype, tuple(state[name].shape)) for name in names}
            for fname, names in layout.items()
        }
        # HF's save_pretrained marks its files {"format": "pt"}; a merge's output carries the same.
        with ModelDirWriter(out_dir, specs, base_dir=base_model_dir, metadata={"format": "pt"}) as writer:
            for names in layout.values():
                for name in names:
                    writer.write(name, state[name])

    def _require_started(self) -> None:
        if self.dht is None:
            raise RuntimeError("Checkpointer is not started: call start()")


def _base_model(base_model_dir: Path):
    """The round's base model and its trained parameters in the swarm's order (``swarm_parameters``)."""
    from transformers import AutoModelForSeq2SeqLM

    # Built exactly as the workers build theirs (from_pretrained of the base), so the parameter list
    # matches: from_config would tie lm_head to the embeddings (transformers 5.x forces tying in T5Config)
    # where the base keeps its own lm_head, and the swarm's trained lm_head would be lost.
    model = AutoModelForSeq2SeqLM.from_pretrained(base_model_dir, dtype=torch.float32)
    return model, swarm_parameters(model)


#: consecutive collection attempts that got no state before the downloader is replaced by a fresh one
_EMPTY_LOOKUPS_BEFORE_RESTART = 8


class _NoDonors(Exception):
    """The downloader found nothing for ``_EMPTY_LOOKUPS_BEFORE_RESTART`` attempts in a row."""


def _checked_state(run_id: str, named, loaded: list) -> list[torch.Tensor]:
    """The downloaded tensors of the model's parameters ``named``, in their order, after checking they fit."""
    # The download holds the trained parameters first (in swarm_parameters order), then the optimizer's
    # statistics (Adam: two moments per parameter, and its step counters), which a version does not keep.
    if len(loaded) < len(named):
        raise CollectError(
            f"run {run_id}: peer sent {len(loaded)} tensors, base architecture has {len(named)} trained "
            "parameters; was the round started from this base version?"
        )
    for (name, param), tensor in zip(named, loaded[: len(named)], strict=True):
        if tuple(tensor.shape) != tuple(param.shape):
            raise CollectError(
                f"run {run_id}: tensor for {name} has shape {tuple(tensor.shape)}, base has {tuple(param.shape)}"
            )
    return list(loaded[: len(named)])


def _state_downloader_class():
    """The checkpointer's :class:`~coldswarm.swarm.guarded_averagers.GuardedStateDownloader` (it answers to and
    calls the workers' ``TrainingStateAverager`` RPC names; hivemind names RPCs after the servicer's class),
    whose process ignores SIGINT itself."""
    from coldswarm.swarm.guarded_averagers import GuardedStateDownloader

    class _StateDownloader(GuardedStateDownloader):
        # hivemind's run_in_background sets SIGINT to SIG_IGN in the calling process, which raises off the
        # main thread (the coordinator collects on a background thread) and would leave the coordinator
        # deaf to Ctrl-C. Ignore SIGINT in the averager's own process instead, where hivemind wants it.
        def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
            self.start()
            if await_ready:
                self.wait_until_ready(timeout)

        def run(self):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            super().run()

    return _StateDownloader
