"""All-reduce benchmark on emulated links: swarmtrain's weighted_allreduce vs torch.distributed gloo.

    sudo .venv/bin/python -m benchmarks.allreduce.bench --peers 4 --size-mb 40 --rate 100mbit --codec fp32 --repeats 3
    sudo .venv/bin/python -m benchmarks.allreduce.bench --matrix

See README.md in this folder. Must run as root from the repository root.
"""
from __future__ import annotations

import argparse
import atexit
import inspect
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import netns

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS_JSONL = HERE / "results.jsonl"
RESULTS_MD = HERE / "results.md"
PORT = 29600
BW_PORT = 5201
CODECS_MATRIX = ("fp32", "fp16", "int8")

HEADER = (
    "| N | S (MB) | link | codec | method | B (MB/s) | median (s) | all reps (s) | ring bound (s) | ratio | "
    "CPU per worker | rendezvous (s) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
METHOD_NAMES = {
    "gloo": "torch.distributed gloo (PG created once)",
    "swarm": "swarmtrain weighted_allreduce (end to end)",
    "split": "swarmtrain: direct pg.allreduce after make_gloo_group",
}

_procs: list[subprocess.Popen] = []


# ------------------------------------------------------------------ cleanup
def _kill_procs() -> None:
    for p in _procs:
        if p.poll() is None:
            p.kill()
    for p in _procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    _procs.clear()


def _cleanup() -> None:
    _kill_procs()
    netns.teardown()


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------ helpers
def rate_bytes_per_s(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate must look like 100mbit or 1gbit, got {rate!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def codec_available(codec: str) -> tuple[bool, str]:
    from averaging.allreduce import weighted_allreduce

    has_param = "codec" in inspect.signature(weighted_allreduce).parameters
    if codec == "fp32":
        return True, ""
    if not has_param:
        return False, f"codec {codec} not available: weighted_allreduce has no `codec` parameter yet (fp32 only)"
    try:
        from averaging.codecs import get_codec

        get_codec(codec)
    except ImportError:
        pass  # the signature says codecs exist; let the worker try
    except Exception as e:  # noqa: BLE001 - any rejection means "not available"
        return False, f"codec {codec} not available: {e}"
    return True, ""


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "code": code_version(),
    }


def code_version() -> str:
    """HEAD commit, plus "+dirty" if averaging/ has uncommitted changes (what the workers ran)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "averaging"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (head or "?") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def nsexec(i: int | str, *argv: str) -> list[str]:
    ns = netns.host_ns(i) if isinstance(i, int) else i
    return ["ip", "netns", "exec", ns, "env", "GLOO_SOCKET_IFNAME=eth0", "OMP_NUM_THREADS=1", *argv]


def measure_bandwidth(rate: str) -> dict:
    """Raw TCP stream swb1 → swb0; returns {"MBps", "bytes", "seconds"}."""
    mbytes = min(100.0, max(50.0, 4 * rate_bytes_per_s(rate) / 1e6))
    recv = subprocess.Popen(nsexec(0, sys.executable, "-m", "benchmarks.allreduce.tcpbw", "recv",
                                   netns.host_addr(0), str(BW_PORT)), cwd=REPO, stdout=subprocess.PIPE, text=True)
    _procs.append(recv)
    assert recv.stdout is not None
    if recv.stdout.readline().strip() != "ready":
        raise RuntimeError("bandwidth receiver did not start")
    subprocess.run(nsexec(1, sys.executable, "-m", "benchmarks.allreduce.tcpbw", "send", netns.host_addr(0),
                          str(BW_PORT), str(mbytes)), cwd=REPO, check=True, timeout=300)
    out, _ = recv.communicate(timeout=60)
    if recv.returncode != 0:
        raise RuntimeError("bandwidth receiver failed")
    _procs.remove(recv)
    return json.loads(out.strip().splitlines()[-1])


TRUSTED = False  # set by main(): which fp32 path the swarm mode measures


def run_workers(n: int, size_mb: float, codec: str, repeats: int, modes: list[str], timeout_s: float) -> list[dict]:
    """Run n workers (one per namespace); returns their RESULT dicts. Raises on any failure."""
    logs = []
    for i in range(n):
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        cmd = nsexec(i, sys.executable, "-m", "benchmarks.allreduce.worker", "--rank", str(i), "--peers", str(n),
                     "--host", netns.host_addr(i), "--master", netns.host_addr(0), "--port", str(PORT),
                     "--size-mb", str(size_mb), "--codec", codec, "--repeats", str(repeats),
                     "--modes", ",".join(modes), "--timeout", "300", *(["--trusted"] if TRUSTED else []))
        _procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    procs = list(_procs[-n:])
    failed = None
    while any(p.poll() is None for p in procs):
        bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad:
            failed = f"worker {bad[0]} exited with {procs[bad[0]].returncode}"
            break
        if time.monotonic() > deadline:
            failed = f"workers did not finish within {timeout_s:.0f}s"
            break
        time.sleep(0.2)
    if failed is None:
        bad = [i for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
            failed = f"worker {bad[0]} exited with {procs[bad[0]].returncode}"
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    if failed is not None:
        _kill_procs()
        detail = "\n".join(f"--- worker {i} ---\n{t[-3000:]}" for i, t in enumerate(texts))
        raise RuntimeError(f"BENCHMARK FAILED: {failed}\n{detail}")
    for p in procs:
        _procs.remove(p)
    results = []
    for i, t in enumerate(texts):
        lines = [line for line in t.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"BENCHMARK FAILED: worker {i} printed no result\n{t[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def summarize(mode: str, results: list[dict], n: int, size_mb: float, B: float) -> dict:
    reps = len(results[0][mode]["time_s"])
    # A repetition ends when the slowest worker has the result.
    times = [max(r[mode]["time_s"][k] for r in results) for k in range(reps)]
    cpu = [statistics.mean(r[mode]["cpu"][k] for r in results) for k in range(reps)]
    bound = 2 * (n - 1) / n * size_mb / B
    med = statistics.median(times)
    s = {"method": mode, "times_s": [round(t, 4) for t in times], "median_s": round(med, 4),
         "bound_s": round(bound, 4), "ratio": round(med / bound, 4), "cpu_per_worker": round(statistics.median(cpu), 4),
         "max_rel_err": max(max(r[mode]["err"]) for r in results)}
    if mode == "split":
        pg = [max(r[mode]["pg_create_s"][k] for r in results) for k in range(reps)]
        s["pg_create_s"] = [round(t, 4) for t in pg]
        s["pg_create_median_s"] = round(statistics.median(pg), 4)
        for key in ("prep_s", "pg_release_s", "post_s", "total_s"):  # local overheads of weighted_allreduce's fp32 path
            s[key + "_median"] = round(statistics.median(max(r[mode][key][k] for r in results) for k in range(reps)), 4)
    if mode == "gloo":
        s["init_s"] = round(max(r[mode]["init_s"][0] for r in results), 4)
    return s


def md_row(n: int, size_mb: float, rate: str, codec: str, B: float, s: dict) -> str:
    rdv = s.get("pg_create_median_s", s.get("init_s"))
    rdv_txt = f"{rdv:.3f}" + (" (once, not timed)" if s["method"] == "gloo" else "") if rdv is not None else "incl."
    if s["method"] == "split":
        rdv_txt += f"; +buffer prep {s['prep_s_median']:.3f}, PG release {s['pg_release_s_median']:.3f}, " \
                   f"checks {s['post_s_median']:.3f}; sum of steps {s['total_s_median']:.3f}"
    return (f"| {n} | {size_mb:g} | {rate} | {codec if s['method'] == 'swarm' else 'fp32'} | {METHOD_NAMES[s['method']]} | "
            f"{B:.2f} | {s['median_s']:.3f} | {', '.join(f'{t:.2f}' for t in s['times_s'])} | {s['bound_s']:.3f} | "
            f"**{s['ratio']:.3f}** | {100 * s['cpu_per_worker']:.0f}% | {rdv_txt} |")


def run_config(n: int, rate: str, sizes: list[float], codecs: list[str], repeats: int, modes: list[str],
               notes: list[str], rows: list[str]) -> None:
    """One network setup (n hosts at `rate`), then every (size, codec) on it."""
    print(f"\n## N={n}, link {rate}: setting up namespaces", flush=True)
    netns.setup(n, rate)
    try:
        bw = measure_bandwidth(rate)
        B = bw["MBps"]
        print(f"raw TCP bandwidth B = {B:.2f} MB/s ({bw['bytes'] / 1e6:.0f} MB in {bw['seconds']:.2f} s)", flush=True)
        info = machine_info()
        for size_mb in sizes:
            for ci, codec in enumerate(codecs):
                ok, why = codec_available(codec)
                if not ok:
                    msg = f"N={n} S={size_mb:g}MB {rate}: {why}; skipped"
                    print(msg, flush=True)
                    notes.append(msg)
                    continue
                # The gloo baseline and the fp32 split timing do not depend on the codec: run them once.
                m = [x for x in modes if x == "swarm" or ci == 0 or codec == "fp32"]
                if codec != "fp32":
                    m = [x for x in m if x != "split"]
                bound = 2 * (n - 1) / n * size_mb / B
                timeout_s = 300 + repeats * len(m) * (6 * bound + 60)
                print(f"running N={n} S={size_mb:g}MB {rate} codec={codec} modes={m} "
                      f"(bound {bound:.2f}s, load {os.getloadavg()[0]:.2f})", flush=True)
                t0 = time.monotonic()
                load0 = os.getloadavg()[0]
                results = run_workers(n, size_mb, codec, repeats, m, timeout_s)
                wall = time.monotonic() - t0
                for mode in m:
                    s = summarize(mode, results, n, size_mb, B)
                    row = md_row(n, size_mb, rate, codec, B, s)
                    print(row, flush=True)
                    rows.append(row)
                    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "N": n, "S_MB": size_mb, "rate": rate,
                           "codec": codec if mode == "swarm" else "fp32", "B_MBps": round(B, 3),
                           "path": ("trusted ring SUM" if TRUSTED and codec == "fp32" else "validated part-wise") if mode == "swarm" else mode,
                           "bandwidth_probe": bw, **s, "wall_s": round(wall, 1),
                           "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
                           "per_rank": [{k: v for k, v in r[mode].items()} for r in results], "max_rss_mb": max(r["max_rss_mb"] for r in results),
                           "machine": info}
                    with open(RESULTS_JSONL, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    finally:
        _kill_procs()
        netns.teardown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--size-mb", type=float, default=40.0, help="fp32 tensor size per peer, MB (10^6 bytes)")
    ap.add_argument("--rate", default="100mbit", help="tc tbf rate of every link direction (100mbit, 1gbit)")
    ap.add_argument("--codec", default="fp32", help="fp32, or fp16/bf16/int8 once weighted_allreduce supports them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trusted", action="store_true",
                    help="swarm mode, fp32: the trusted ring-SUM path (default: the validated part-wise path)")
    ap.add_argument("--modes", default="gloo,swarm,split", help="subset of gloo,swarm,split")
    ap.add_argument("--matrix", action="store_true",
                    help="N in {4,8} x S in {40,400} MB x rate in {100mbit,1gbit} x codecs fp32/fp16/int8; "
                         "writes results.md")
    ap.add_argument("--sizes", default="40,400", help="with --matrix: sizes in MB")
    ap.add_argument("--matrix-peers", default="4,8", help="with --matrix: peer counts")
    ap.add_argument("--matrix-rates", default="100mbit,1gbit", help="with --matrix: link rates")
    a = ap.parse_args(argv)
    global TRUSTED
    TRUSTED = a.trusted
    if os.geteuid() != 0:
        print("must run as root (network namespaces, tc)", file=sys.stderr)
        return 2
    modes = [m for m in a.modes.split(",") if m]
    if not set(modes) <= set(METHOD_NAMES):
        ap.error(f"--modes: unknown {set(modes) - set(METHOD_NAMES)}")
    atexit.register(_cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)

    notes: list[str] = []
    rows: list[str] = []
    print(HEADER, flush=True)
    try:
        if a.matrix:
            for n in [int(x) for x in a.matrix_peers.split(",")]:
                for rate in a.matrix_rates.split(","):
                    run_config(n, rate, [float(x) for x in a.sizes.split(",")], list(CODECS_MATRIX), a.repeats,
                               modes, notes, rows)
        else:
            ok, why = codec_available(a.codec)
            if not ok:
                print(why, file=sys.stderr)
                return 2
            run_config(a.peers, a.rate, [a.size_mb], [a.codec], a.repeats, modes, notes, rows)
    finally:
        _cleanup()
        print("\n" + HEADER + "\n" + "\n".join(rows), flush=True)
        if a.matrix:
            write_md(rows, notes)
    return 0


def write_md(rows: list[str], notes: list[str]) -> None:
    info = machine_info()
    text = [
        "# All-reduce benchmark results (`python -m benchmarks.allreduce.bench --matrix`)", "",
        f"Machine: {info['nproc']} cores, {info['cpu_model']}, kernel {info['kernel']}, torch {info['torch']}, "
        f"{info['mem_gb']} GiB. Generated {time.strftime('%Y-%m-%d %H:%M')}.", "",
        "ratio = median time / ring bound 2(N-1)/N·S/B, B = raw TCP bandwidth measured on the same links. "
        "Time of a repetition = slowest worker. CPU = process CPU time / wall time, per worker "
        "(100% = one core).", "",
        HEADER, *rows, "",
    ]
    if notes:
        text += ["Notes:", *[f"- {x}" for x in notes], ""]
    RESULTS_MD.write_text("\n".join(text))
    print(f"wrote {RESULTS_MD}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        sys.exit(1)
