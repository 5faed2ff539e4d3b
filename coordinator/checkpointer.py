"""The coordinator's hivemind side: the swarm's DHT bootstrap peer and its checkpointer.

The coordinator runs one long-lived DHT peer. Its visible multiaddrs are the ``initial_peers`` handed to
workers in every ``PretrainTask``. At the end of a pretrain round the checkpointer downloads the averaged
state from the peer with the newest epoch (hivemind's ``load_state_from_peers``: the same path a late joiner
uses, fp32, exact), puts it into a model of the round's base architecture, and writes an HF directory that
``from_pretrained`` loads, plus the swarm's metrics. It never trains and never takes part in averaging: it
attaches to the run's state averager with state sharing off, so no worker ever downloads from it.

Usage (the round manager)::

    from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig

    ckpt = Checkpointer(CheckpointerConfig(host_maddrs=["/ip4/0.0.0.0/tcp/31337"],
                                           identity_path=data_dir / "dht.key"))
    ckpt.start()
    task.initial_peers.extend(ckpt.initial_peers)            # hand these to workers
    ...                                                      # workers train run_id for `epochs` epochs
    metrics = ckpt.collect(run_id, base_model_dir, out_dir, min_epoch=epochs, timeout=600)
    record_version(out_dir, round_id, kind="pretrain", metrics=metrics)
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coldswarm.fusion.checkpoint import CheckpointReader, ModelDirWriter
from coldswarm.swarm.averagers import state_prefix
from coldswarm.swarm.averaging_codecs import register_safe_codecs
from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.parameters import swarm_parameters
from coldswarm.swarm.records import ENDED_UNCOLLECTED, collected_key, metrics_key, peer_metrics, run_validator

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
            "help": "private key file; with a fixed port keeps the peer id (and initial_peers) across restarts"
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


class Checkpointer:
    """The DHT bootstrap peer plus the checkpointer of pretrain rounds. Not thread-safe: one collect at a time."""

    def __init__(self, config: CheckpointerConfig | None = None):
        self.config = config or CheckpointerConfig()
        self.dht = None
        self._validated_runs: set[str] = set()

    def start(self) -> Checkpointer:
        """Start the DHT peer (a background process and its p2p daemon). Idempotent."""
        if self.dht is None:
            cfg = self.config
            kwargs = {}
            if cfg.identity_path is not None:
                Path(cfg.identity_path).parent.mkdir(parents=True, exist_ok=True)
                kwargs["identity_path"] = str(cfg.identity_path)
            self.dht = start_dht(cfg.initial_peers, cfg.host_maddrs, cfg.announce_maddrs, **kwargs)
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

    def shutdown(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
            self._validated_runs.clear()

    def _validate_run(self, run_id: str) -> None:
        """Make the DHT peer refuse malformed records under ``run_id``'s keys (once per run and peer)."""
        if run_id not in self._validated_runs:
            self.dht.add_validators([run_validator(run_id)])
            self._validated_runs.add(run_id)

    # -- what the swarm reports -------------------------------------------------------------------------

    def swarm_metrics(self, run_id: str) -> dict[str, float]:
        """The swarm's totals from what peers published under ``metrics_key(run_id)``: samples and steps summed
        over every peer that took part (records outlive their peer for an hour), loss averaged over peers
        weighted by their samples, the number of peers, and the newest epoch any peer reported."""
        self._require_started()
        self._validate_run(run_id)
        records = peer_metrics(self.dht.get(metrics_key(run_id), latest=True))
        samples = sum(r.samples for r in records)
        with_loss = [r for r in records if r.loss is not None]
        loss_weight = sum(r.samples for r in with_loss)
        if with_loss and loss_weight > 0:
            loss = sum(r.loss * r.samples for r in with_loss) / loss_weight
        elif with_loss:
            loss = sum(r.loss for r in with_loss) / len(with_loss)
        else:
            loss = math.nan
        return {
            "swarm_loss": loss,
            "swarm_samples": float(samples),
            "swarm_steps": float(sum(r.steps for r in records)),
            "swarm_peers": float(len(records)),
            "swarm_samples_per_s": float(sum(r.samples_per_s for r in records)),
            "swarm_epoch_reported": float(max((r.epoch for r in records), default=0)),
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
    ) -> dict[str, float]:
        """Download the swarm's averaged state for ``run_id`` and write it as an HF directory at ``out_dir``.

        :param base_model_dir: the round's base version (HF directory): gives the architecture, the
          non-weight files, and the parameter order (via ``swarm_parameters``) to map tensors to names.
        :param out_dir: must not exist; written atomically.
        :param min_epoch: keep trying until a peer serves a state of at least this epoch (the round's
          ``epochs``), or ``timeout`` passes.
        :returns: metrics: ``epoch`` (of the collected state), ``swarm_loss``, ``swarm_samples``,
          ``swarm_steps``, ``swarm_peers``, ``swarm_samples_per_s``, ``collect_seconds``.
        :raises CollectError: nothing collected in time, or the state does not fit the base architecture.
        :raises FileExistsError: ``out_dir`` exists.

        Afterwards it announces the collection under ``collected_key(run_id)`` so workers waiting in
        ``SwarmTrainer.serve_state`` may leave.
        """
        from hivemind.utils import get_dht_time
        from transformers import AutoModelForSeq2SeqLM

        self._require_started()
        self._validate_run(run_id)
        register_safe_codecs()
        base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} exists; a version directory is written once")
        began = time.monotonic()

        # Built exactly as the workers build theirs (from_pretrained of the base), so the parameter list
        # matches: from_config would tie lm_head to the embeddings (transformers 5.x forces tying in T5Config)
        # where the base keeps its own lm_head, and the swarm's trained lm_head would be lost.
        model = AutoModelForSeq2SeqLM.from_pretrained(base_model_dir, dtype=torch.float32)
        named = swarm_parameters(model)
        tensors = [param.detach().to("cpu", torch.float32).clone() for _, param in named]

        # A plain averager under the run's state-averager prefix: it can download what the workers'
        # TrainingStateAverager serves, but never steps (never joins an averaging group) and does not offer its
        # own state (allow_state_sharing=False), so it changes nothing in the swarm.
        averager = _state_downloader_class()(
            tensors,
            self.dht,
            prefix=state_prefix(run_id),
            start=True,
            allow_state_sharing=False,
            request_timeout=self.config.request_timeout,
            next_chunk_timeout=self.config.load_state_timeout,
        )
        try:
            metadata, loaded = self._download(averager, run_id, min_epoch, began + timeout)
        finally:
            averager.shutdown()

        epoch = int(metadata["epoch"])
        # The download holds the trained parameters first (in swarm_parameters order), then the optimizer's
        # statistics (Adam: two moments per parameter, and its step counters), which a version does not keep.
        if len(loaded) < len(named):
            raise CollectError(
                f"run {run_id}: peer sent {len(loaded)} tensors, base architecture has {len(named)} trained "
                "parameters; was the round started from this base version?"
            )
        state = {}
        for (name, param), tensor in zip(named, loaded[: len(named)], strict=True):
            if tuple(tensor.shape) != tuple(param.shape):
                raise CollectError(
                    f"run {run_id}: tensor for {name} has shape {tuple(tensor.shape)}, base has {tuple(param.shape)}"
                )
            state[name] = tensor
        with torch.no_grad():
            for name, param in named:
                param.copy_(state[name].to(param.dtype))

        self._write_version_dir(model, base_model_dir, out_dir)
        metrics = {"epoch": float(epoch), **self.swarm_metrics(run_id)}
        metrics["collect_seconds"] = time.monotonic() - began
        self.dht.store(collected_key(run_id), epoch, expiration_time=get_dht_time() + 3600)
        logger.info("collected run %s at epoch %d into %s: %s", run_id, epoch, out_dir, metrics)
        return metrics

    def announce_end(self, run_id: str) -> None:
        """Tell the run's peers serving their state that nothing will be collected (the round was cancelled
        or failed), so they leave now instead of at their serving timeout."""
        from hivemind.utils import get_dht_time

        self._require_started()
        self._validate_run(run_id)
        self.dht.store(collected_key(run_id), ENDED_UNCOLLECTED, expiration_time=get_dht_time() + 3600)

    def _download(self, averager, run_id: str, min_epoch: int, deadline: float):
        # load_state_from_peers asks the peer with the highest declared priority (= its epoch); peers refresh
        # that declaration every epoch, so retry until one at min_epoch answers.
        best_epoch, attempts = None, 0
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            result = averager.load_state_from_peers(timeout=min(self.config.load_state_timeout, remaining))
            if result is not None:
                metadata, loaded = result
                epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
                if isinstance(epoch, int) and epoch >= min_epoch:
                    return metadata, loaded
                best_epoch = epoch if best_epoch is None else max(best_epoch, epoch or 0)
            time.sleep(min(self.config.poll_interval, max(0.0, deadline - time.monotonic())))
        raise CollectError(
            f"run {run_id}: no peer served a state of epoch >= {min_epoch} in time "
            f"({attempts} attempts; newest epoch seen: {best_epoch})"
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


def _state_downloader_class():
    """A ``DecentralizedAverager`` that downloads from the workers' ``TrainingStateAverager``.

    hivemind names RPC handlers ``{prefix}::{ServicerClassName}.rpc_...``, and ``load_state_from_peers`` builds
    its stub from ``type(self)``: a plain ``DecentralizedAverager`` asks for
    ``...::DecentralizedAverager.rpc_download_state`` and the workers answer "protocols not supported". So
    the stub is made from ``TrainingStateAverager``, whose class the workers serve under.
    """
    from hivemind.averaging import DecentralizedAverager
    from hivemind.optim.state_averager import TrainingStateAverager

    class _StateDownloader(DecentralizedAverager):
        @classmethod
        def get_stub(cls, p2p, peer, *, namespace=None):
            return TrainingStateAverager.get_stub(p2p, peer, namespace=namespace)

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
