"""A peer process for fault-injection tests: joins the round-0 group, then dies with SIGKILL.

Usage: python -m tests.fault_peer RUN_ID BOOTSTRAP_MADDR
"""
import os
import signal
import sys

from averaging import AveragerConfig, Averager, MatchmakingConfig, SwarmDHT

run_id, addr = sys.argv[1], sys.argv[2]
dht = SwarmDHT.start(run_id, initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
av = Averager(dht, AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1",
                                  matchmaking=MatchmakingConfig(window=30)))
group = av.matchmaker.form_group(0, "fp", expected_size=lambda: 3)
print(f"joined group of {group.size} as rank {group.rank}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the fault: die after matchmaking, before the transfer
