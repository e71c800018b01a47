"""What signed, schema-checked peer records cost: size on the wire and CPU per publish/check.

    python benchmarks/records.py

Every peer publishes its record every `announce_period` (2 s) and every DHT node that stores
or returns it verifies the RSA signature and the schema. This measures those steps in
isolation with hivemind's own validators, on one core.
"""
from __future__ import annotations

import platform
import statistics
import time

import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from averaging.identity import ephemeral_identity
from peer.membership import RECENT_ROUNDS, PeerRecord, RoundOutcome, record_validator


def timeit(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    ident = ephemeral_identity()
    ident.discard()
    validator = CompositeValidator([ident.validator(), record_validator("bench-run")])
    rec = PeerRecord(round=120, fingerprint="0123456789abcdef", schema="14 tensors, 431,360 parameters", digest="ab" * 32,
                     host="198.18.0.5", port=40123, step=6000, samples=384000, loss=2.4321, device="cuda", version="0.1.0",
                     t=get_dht_time(), samples_per_s=812.5, compute_s=3600.0, rounds_ok=118, rounds_failed=2,
                     bytes_sent=10**9, bytes_recv=10**9, flops_per_sample=1.3e11,
                     recent=tuple(RoundOutcome(round=116 + i, status="complete", duration_s=0.42, bytes=3_500_000,
                                               members=4, t=get_dht_time()) for i in range(RECENT_ROUNDS)))
    key = DHTID.generate(source="bench-run_peers").to_bytes()
    subkey = MSGPackSerializer.dumps(ident.owner_subkey)
    value = MSGPackSerializer.dumps(rec.to_record())
    record = DHTRecord(key, subkey, value, get_dht_time() + 10)
    signed = validator.sign_value(record)
    signed_record = DHTRecord(key, subkey, signed, record.expiration_time)
    assert validator.validate(signed_record)
    sign_s = timeit(lambda: validator.sign_value(record), 200)
    check_s = timeit(lambda: validator.validate(signed_record), 200)
    parse_s = timeit(lambda: PeerRecord.parse("p", rec.to_record()), 500)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, 1 thread")
    print(f"record: {len(value)} B value + {len(subkey)} B subkey (public key) + {len(signed) - len(value)} B signature")
    print(f"sign (author, per publish):           {sign_s * 1e3:.2f} ms")
    print(f"validate (every storing/reading node): {check_s * 1e3:.2f} ms  (RSA verify + pydantic schema)")
    print(f"PeerRecord.parse (reader):            {parse_s * 1e3:.3f} ms")
    print(f"at 1 publish / 2 s: {sign_s / 2 * 100:.3f}% of one core to sign; "
          f"a node storing 100 peers' records: {100 * check_s / 2 * 100:.1f}% of one core to validate")


if __name__ == "__main__":
    main()
