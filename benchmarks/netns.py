"""A private network of Linux network namespaces with rate-limited links, for the swarm benchmark.

    python benchmarks/netns.py check --rate 20mbit      # build 2 nodes, measure a TCP transfer, tear down
    python benchmarks/netns.py sweep                    # delete namespaces left by a killed run

Topology: one *switch* namespace holding a bridge, and one namespace per node (a swarm peer, the DHT
bootstrap). Each node has a veth pair: ``eth0`` inside the node with an address of the private subnet
10.213.0.0/24, the other end on the switch's bridge. Nothing is created in the caller's namespace, so the
subnet exists only between these namespaces and no traffic can leave them. Each *shaped* node's egress runs
through ``tc tbf`` at the given rate: what a home uplink limits. No latency is added (``tc netem`` does not
exist on this kernel; a userspace delay would have to proxy every connection, and the figures here are
about bandwidth).

Bytes on the wire are read from each node's ``eth0`` tx counter (``/sys/class/net/eth0/statistics``
inside the namespace): everything the node sent, framing, DHT traffic and retransmissions included.

Every namespace is named ``coldswarm-bench-<pid>-...``; :class:`Network` deletes all of its own on exit
(also on an exception or Ctrl-C), and :func:`sweep` deletes those of runs whose process is gone.
Needs root (``ip netns``, veth, bridge, ``tc``).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "coldswarm-bench-"
SUBNET = "10.213.0"


def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def sweep(all_runs: bool = False) -> list[str]:
    """Delete benchmark namespaces whose creating process is gone (every one of them with ``all_runs``)."""
    deleted = []
    for name in namespaces():
        match = re.match(rf"{PREFIX}(\d+)-", name)
        if match is None:
            continue
        pid = int(match.group(1))
        if all_runs or not Path(f"/proc/{pid}").exists():
            _run("ip", "netns", "del", name, check=False)
            deleted.append(name)
    return deleted


class Network:
    """``nodes`` namespaces on one bridge; ``rate`` (tc syntax: ``20mbit``; None: unshaped) on the egress
    of every node in ``shaped`` (default: all). Use as a context manager; :meth:`close` is idempotent."""

    def __init__(self, nodes: int, rate: str | None = None, shaped: set[int] | None = None):
        if not 1 <= nodes <= 200:
            raise ValueError("1 to 200 nodes")
        self.nodes, self.rate = nodes, rate
        self.shaped = set(range(nodes)) if shaped is None else set(shaped)
        self.tag = f"{PREFIX}{os.getpid()}-"
        self.switch = f"{self.tag}sw"
        self._made: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 2}"

    def __enter__(self) -> Network:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self._add_ns(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.nodes):
            ns = self.ns(i)
            self._add_ns(ns)
            # Both ends are created inside their namespaces: nothing appears in the caller's.
            _run(
                "ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth",
                "peer", "name", f"p{i}", "netns", self.switch,
            )  # fmt: skip
            _run("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", f"p{i}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.rate and i in self.shaped:
                # burst: enough for one GSO super-packet plus 10 ms at the rate; queue up to 100 ms.
                bits = _rate_bits(self.rate)
                burst = max(64 * 1024, bits // 8 // 100)
                _run(
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                    "rate", self.rate, "burst", str(burst), "latency", "100ms",
                )  # fmt: skip

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        while self._made:
            _run("ip", "netns", "del", self._made.pop(), check=False)

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def tx_bytes(self, i: int) -> int:
        """Bytes node ``i`` has sent on its link so far."""
        out = _run("ip", "netns", "exec", self.ns(i), "cat", "/sys/class/net/eth0/statistics/tx_bytes")
        return int(out.strip())

    def tcp_rate(self, src: int, dst: int, seconds: float = 4.0) -> float:
        """Measured goodput in Mbit/s of one TCP stream from node ``src`` to node ``dst``."""
        port = 40000 + os.getpid() % 20000
        sink = subprocess.Popen(
            self.exec_argv(dst, [sys.executable, __file__, "sink", "--port", str(port)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            source_argv = [sys.executable, __file__, "source", "--host", self.ip(dst), "--port", str(port)]
            source_argv += ["--seconds", str(seconds)]
            subprocess.run(self.exec_argv(src, source_argv), check=True, timeout=seconds + 30)
            out, _ = sink.communicate(timeout=30)
        finally:
            if sink.poll() is None:
                sink.kill()
                sink.wait()
        received, elapsed = map(float, out.split())
        return received * 8 / elapsed / 1e6


def _rate_bits(rate: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if match is None:
        raise ValueError(f"rate {rate!r}: expected e.g. 20mbit or 100mbit")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2)])


def _sink(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as server:
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            total, began = 0, None
            while chunk := conn.recv(1 << 16):
                began = began or time.perf_counter()
                total += len(chunk)
            print(total, time.perf_counter() - (began or time.perf_counter()))


def _source(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    payload = b"\0" * (1 << 16)
    with conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(payload)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="build 2 nodes, measure a TCP transfer between them, tear down")
    check.add_argument("--rate", default="20mbit")
    sweep_p = sub.add_parser("sweep", help="delete namespaces of benchmark runs that are gone")
    sweep_p.add_argument("--all", action="store_true", help="also those of running benchmarks")
    sink = sub.add_parser("sink")
    sink.add_argument("--port", type=int, required=True)
    source = sub.add_parser("source")
    source.add_argument("--host", required=True)
    source.add_argument("--port", type=int, required=True)
    source.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        with Network(2, args.rate) as net:
            print(f"TCP {net.ip(0)} -> {net.ip(1)} through tbf {args.rate}: {net.tcp_rate(0, 1):.1f} Mbit/s")
        print(f"left behind: {[n for n in namespaces() if n.startswith(net.tag)]}")
    elif args.cmd == "sweep":
        print("deleted:", sweep(args.all))
    elif args.cmd == "sink":
        _sink(args.port)
    elif args.cmd == "source":
        _source(args.host, args.port, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
