"""Pure logic of the worker daemon: no coordinator, no training."""

import random
import stat

import pytest

from coldswarm.common.fetch import DownloadError, safe_relpath
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.backoff import Backoff
from coldswarm.worker.capabilities import resolve_device
from coldswarm.worker.progress import Progress
from coldswarm.worker.session import Session, load_session, save_session
from coldswarm.worker.uploads import _chunks


def test_backoff_grows_caps_and_resets():
    b = Backoff(base_s=1.0, factor=2.0, cap_s=5.0, rng=random.Random(0))
    ceilings = [1, 2, 4, 5, 5, 5]
    for ceiling in ceilings:
        assert 0.0 <= b.next_delay() <= ceiling
    assert b.attempt == len(ceilings)
    b.reset()
    assert b.attempt == 0 and b.next_delay() <= 1.0


def test_backoff_jitter_spreads_workers():
    delays = {round(Backoff(base_s=1.0, rng=random.Random(seed)).next_delay(), 6) for seed in range(20)}
    assert len(delays) == 20


def test_session_file_is_private_and_scoped_to_coordinator(tmp_path):
    path = tmp_path / "session.json"
    save_session(path, Session("127.0.0.1:1", "w-1", "secret", 2.0, ["/ip4/127.0.0.1/tcp/1"]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_session(path, "127.0.0.1:1").session_token == "secret"
    assert load_session(path, "other:1") is None
    path.write_text("{not json")
    assert load_session(path, "127.0.0.1:1") is None


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../b", ""])
def test_unsafe_version_paths_are_refused(bad):
    with pytest.raises(DownloadError):
        safe_relpath(bad)


def test_safe_relpath_accepts_nested():
    assert str(safe_relpath("tokenizer/spiece.model")) == "tokenizer/spiece.model"


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize("size,offset", [(10, 0), (10, 4), (10, 10), (0, 0), (4096, 0)])
def test_upload_chunks_cover_the_payload_once_and_hash_only_the_last(tmp_path, size, offset):
    payload = tmp_path / "p"
    payload.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    chunks = list(_chunks(payload, "u", offset, size, 3, "abc", None))
    assert b"".join(c.data for c in chunks) == payload.read_bytes()[offset:]
    assert [c.sha256 for c in chunks] == [""] * (len(chunks) - 1) + ["abc"]
    expected = offset
    for c in chunks:
        assert c.offset == expected
        expected += len(c.data)


def test_progress_heartbeat_snapshot():
    p = Progress()
    p.update(assignment_id="a", phase="training", step=3, total_steps=10, loss=1.5, metrics={"x": 2})
    hb = p.heartbeat()
    assert isinstance(hb, pb.HeartbeatRequest)
    assert (hb.assignment_id, hb.step, hb.total_steps, hb.metrics["x"]) == ("a", 3, 10, 2.0)


def test_training_bar_follows_the_training_phase(capsys):
    p = Progress(show_bar=True, assignment_id="a-1")
    p.update(phase="training", step=0, total_steps=5)
    for step in range(1, 6):
        p.update(step=step, loss=1.0 / step, samples_per_s=3.0)
    p.update(phase="statistics")
    assert p._bar is None, "the bar closes when training ends"
    drawn = capsys.readouterr().err
    assert "training a-1" in drawn and "5/5" in drawn and "loss=0.200" in drawn
    quiet = Progress(assignment_id="a-2")  # not on a terminal: no bar at all
    quiet.update(phase="training", step=1, total_steps=5)
    assert quiet._bar is None and capsys.readouterr().err == ""


def test_heartbeat_carries_the_measured_bandwidth_once_known():
    p = Progress()
    assert "bandwidth_bytes_per_s" not in p.heartbeat().metrics
    p.update(bandwidth_bytes_per_s=12.5e6, metrics={"epoch": 1.0})
    assert dict(p.heartbeat().metrics) == {"epoch": 1.0, "bandwidth_bytes_per_s": 12.5e6}


def test_cpu_threads_limit_torch_and_openmp():
    import subprocess
    import sys

    # In a child: the thread pool is process-wide and the test process's must stay as it is.
    code = (
        "import os, torch\n"
        "from coldswarm.worker.cli import limit_cpu_threads\n"
        "limit_cpu_threads(1)\n"
        "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["1", "1"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "coldswarm.worker.cli",
            "--coordinator=127.0.0.1:1",
            "--token=t",
            "--cpu-threads=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--cpu-threads must be at least 1" in bad.stderr
