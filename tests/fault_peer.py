"""A peer process for fault-injection tests: joins the round-0 group, then dies with SIGKILL,
either right after matchmaking (before the transfer) or, with `mid-transfer`, once the
transfer has begun (after the members' metadata exchange, through the `crash` tamper seam).

Usage: python -m tests.fault_peer RUN_ID BOOTSTRAP_MADDR [after-matchmaking|mid-transfer]
"""
import os
import signal
import sys

import torch

from averaging import AveragerConfig, Averager, MatchmakingConfig, SwarmDHT
from averaging.faults import Tamper

run_id, addr = sys.argv[1], sys.argv[2]
when = sys.argv[3] if len(sys.argv) > 3 else "after-matchmaking"
dht = SwarmDHT.start(run_id, initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
av = Averager(dht, AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1",
                                  matchmaking=MatchmakingConfig(window=30)),
              tamper=Tamper(mode="crash") if when == "mid-transfer" else None)
if when == "mid-transfer":
    print("joining round 0 to die mid-transfer", flush=True)
    av.average(0, "fp", torch.zeros(10_000), 1.0, expected_size=lambda: 3)  # never returns: SIGKILLed inside
    print("survived?!", flush=True)
    sys.exit(1)
group = av.matchmaker.form_group(0, "fp", expected_size=lambda: 3)
print(f"joined group of {group.size} as rank {group.rank}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the fault: die after matchmaking, before the transfer
