"""Emulated WAN for benchmarks: N network namespaces behind one bridge, every link rate-limited.

    swb0 .. swbN-1   hosts; eth0 = 198.18.0.(i+1)/24, lo up
    swbsw            the "switch": bridge swbbr, host-side veth ends swbh0 .. swbhN-1

Both directions of every link are shaped with `tc tbf` (the kernel has no netem, so no
delay is emulated): on eth0 inside each host (upload) and on swbhI inside the switch
(download). Only addresses in 198.18.0.0/15 (RFC 2544) are used; no interface is created
in the caller's namespace (veth ends are created directly inside the namespaces), so
nothing outside the "swb" names is touched.

Usage (root):  python -m benchmarks.allreduce.netns up 4 100mbit
               python -m benchmarks.allreduce.netns down
"""
from __future__ import annotations

import re
import subprocess
import sys

PREFIX = "swb"
SWITCH = f"{PREFIX}sw"
BRIDGE = f"{PREFIX}br"
_OUR_NS = re.compile(rf"^{PREFIX}(\d+|sw)$")


def host_ns(i: int) -> str:
    return f"{PREFIX}{i}"


def host_addr(i: int) -> str:
    return f"198.18.0.{i + 1}"


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"[{ns}] tc {' '.join(args)}: {r.stderr.strip()}")


def our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _OUR_NS.match(n)]


def teardown() -> None:
    """Delete every swb* namespace (their veths and the bridge go with them). Idempotent."""
    for ns in our_namespaces():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def shape(ns: str, dev: str, rate: str) -> None:
    _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "400ms")


def setup(n: int, rate: str | None) -> list[str]:
    """Create the switch and n hosts; returns the hosts' addresses. Tears down on failure."""
    if not 1 <= n <= 250:
        raise ValueError(f"1 <= n <= 250 required, got {n}")
    teardown()
    try:
        _ip("netns", "add", SWITCH)
        _ip("-n", SWITCH, "link", "set", "lo", "up")
        _ip("-n", SWITCH, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", SWITCH, "link", "set", BRIDGE, "up")
        for i in range(n):
            ns, hv = host_ns(i), f"{PREFIX}h{i}"
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Both ends are created directly in their namespaces: nothing appears in ours.
            _ip("-n", SWITCH, "link", "add", hv, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", SWITCH, "link", "set", hv, "master", BRIDGE)
            _ip("-n", SWITCH, "link", "set", hv, "up")
            _ip("-n", ns, "addr", "add", f"{host_addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if rate:
                shape(ns, "eth0", rate)  # upload
                shape(SWITCH, hv, rate)  # download
    except BaseException:
        teardown()
        raise
    return [host_addr(i) for i in range(n)]


def describe() -> str:
    out = []
    for ns in our_namespaces():
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show"], capture_output=True, text=True)
        out.append(f"[{ns}]\n{r.stdout.strip()}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"] and len(argv) in (2, 3):
        print(setup(int(argv[1]), argv[2] if len(argv) == 3 else None))
        return 0
    if argv == ["down"]:
        teardown()
        return 0
    if argv == ["show"]:
        print(describe())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
