"""A worker for namespace tests: one rank of a group all-reduce over shaped links.

Usage: python -m tests.ns_worker RANK N MASTER_IP OWN_IP NUMEL TIMEOUT [DIE_AFTER_S]
Prints one JSON line with the outcome. With DIE_AFTER_S, the process SIGKILLs itself that
many seconds after the transfer starts: a real crash in the middle of the transfer.
"""
import hashlib
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
from torch.distributed import TCPStore

from averaging.allreduce import weighted_allreduce
from averaging.matchmaking import Group

rank, n, master, me, numel, timeout = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                       int(sys.argv[5]), float(sys.argv[6]))
die_after = float(sys.argv[7]) if len(sys.argv) > 7 else None
torch.set_num_threads(1)
store = TCPStore(master, 29500, world_size=n, is_master=rank == 0, timeout=timedelta(seconds=60))
delta = torch.full((numel,), float(rank + 1))
digest = hashlib.sha256(delta.numpy().tobytes()).hexdigest()
store.add("ready", 1)
while store.add("ready", 0) < n:  # start together
    time.sleep(0.01)
if die_after is not None:
    threading.Timer(die_after, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
t0 = time.monotonic()
res = weighted_allreduce(Group(0, tuple(map(str, range(n))), rank, "t/", store), delta, 1.0, host=me, timeout_s=timeout)
print(json.dumps({"rank": rank, "status": res.status, "error": res.error, "elapsed": time.monotonic() - t0,
                  "unchanged": hashlib.sha256(delta.numpy().tobytes()).hexdigest() == digest,
                  "mean_ok": res.ok and bool(torch.allclose(res.mean_delta, torch.full((numel,), (n + 1) / 2)))}),
      flush=True)
if rank == 0:  # keep the store alive until the others have reported
    time.sleep(2)
