"""Raw TCP bandwidth between two hosts: one stream, 1 s warm-up, then a measured transfer.

    python -m benchmarks.allreduce.tcpbw recv HOST PORT          # prints "ready", then {"mbps": ...}
    python -m benchmarks.allreduce.tcpbw send HOST PORT MBYTES   # 1 s warm-up, then MBYTES

The receiver measures: the rate over the bytes that arrive after the first second.
MB = 10^6 bytes throughout.
"""
from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 1 << 20
WARMUP_S = 1.0


def recv(host: str, port: int) -> dict:
    with socket.create_server((host, port)) as srv:
        print("ready", flush=True)
        srv.settimeout(60)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(120)
            buf = bytearray(CHUNK)
            total, t_first, mark = 0, None, None
            while True:
                k = conn.recv_into(buf)
                if not k:
                    break
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                total += k
                if mark is None and now - t_first >= WARMUP_S:
                    mark = (now, total)
            t_end = time.perf_counter()
    if mark is None or t_end - mark[0] <= 0:
        raise RuntimeError("transfer too short to measure")
    return {"MBps": (total - mark[1]) / (t_end - mark[0]) / 1e6, "bytes": total - mark[1], "seconds": t_end - mark[0]}


def send(host: str, port: int, mbytes: float) -> None:
    data = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=30) as s:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < WARMUP_S:
            s.sendall(data)
        left = int(mbytes * 1e6)
        while left > 0:
            k = min(left, CHUNK)
            s.sendall(data[:k])
            left -= k
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the receiver to close


def main(argv: list[str]) -> int:
    if argv[:1] == ["recv"] and len(argv) == 3:
        print(json.dumps(recv(argv[1], int(argv[2]))), flush=True)
        return 0
    if argv[:1] == ["send"] and len(argv) == 4:
        send(argv[1], int(argv[2]), float(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
