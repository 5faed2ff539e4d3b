"""Run by tests/swarm/test_dht_process.py in a fresh interpreter: averagers that start and stop at once.

Each averager asks the DHT for things from its own process and may exit before the DHT has opened the reply
pipe of its last request. Prints how many cycles ran and whether the DHT still answers afterwards.
"""

import sys

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.utils import get_dht_time

from coldswarm.swarm.dht import start_dht

CYCLES = 6


def main() -> None:
    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        for cycle in range(CYCLES):
            averager = DecentralizedAverager([torch.zeros(4)], dht, prefix=f"churn{cycle}", start=True)
            averager.shutdown()
        print("cycles:", CYCLES)
        print("dht process:", "alive" if dht.is_alive() else "dead")
        stored = dht.store(
            "churn_probe", "still here", expiration_time=get_dht_time() + 60, return_future=True
        )
        stored.result(timeout=30)
        found = dht.get("churn_probe", return_future=True).result(timeout=30)
        print("dht answers:", "yes" if found is not None and found.value == "still here" else "no")
    finally:
        dht.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
