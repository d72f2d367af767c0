"""What each key source costs: ``open()`` time against a plain key string in the same run,
and the calls made to the key holder by ``open()`` and by 1,000 ``get_credentials`` after
it. The KMS is moto's server on loopback (botocore's real HTTP client), the HSM SoftHSM2."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result, scratch_database

from integrations import Integrations, generate_key
from integrations._keysource import CALLS
from tests.keykit import AWS_ENV, MotoKms, SoftHsm

API_KEY = "sk-bench-0123456789abcdef"
OPENS = 7
READS = 1000


async def main() -> None:
    logging.getLogger("integrations").setLevel(logging.ERROR)
    os.environ.update(AWS_ENV)
    kms = MotoKms()
    kms.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            hsm = SoftHsm(folder / "hsm")
            hsm.create_kek()
            plain = generate_key()
            os.environ["BENCH_KEYS"] = plain
            key_file = folder / "keys"
            key_file.write_text(plain + "\n")
            key_file.chmod(0o600)
            helper = folder / "helper.sh"
            helper.write_text(f"#!/bin/sh\necho {plain}\n")
            helper.chmod(0o700)
            sources = {
                "key": plain,
                "env": "env:BENCH_KEYS",
                "file": f"file:{key_file}",
                "command": f"command:{helper}",
                "aws-kms": kms.source(kms.create_key()),
                "pkcs11": hsm.source(),
            }
            figures: dict[str, float] = {}
            rows: dict[str, str] = {}
            async with scratch_database() as dsn:
                for kind, spec in sources.items():
                    schema = "bench_" + kind.replace("-", "_")
                    # The first open makes the data key (KMS, HSM); it is timed apart.
                    started = time.perf_counter()
                    first_calls = CALLS[kind]
                    async with Integrations(dsn, keys=spec, schema=schema) as integ:
                        first = time.perf_counter() - started
                        first_calls = CALLS[kind] - first_calls
                        conn = await integ.add_connection("openai", "bench")
                        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
                    rows[kind] = conn.uuid
                    figures[f"{kind}_first_open_ms"] = first * 1e3
                    figures[f"{kind}_first_open_calls"] = first_calls
                # Rounds in turn over the sources, so that drift on the machine hits all alike.
                times: dict[str, list[float]] = {kind: [] for kind in sources}
                calls: dict[str, list[int]] = {kind: [] for kind in sources}
                per_reads: dict[str, int] = {}
                for _ in range(OPENS):
                    for kind, spec in sources.items():
                        schema = "bench_" + kind.replace("-", "_")
                        before = CALLS[kind]
                        started = time.perf_counter()
                        async with Integrations(dsn, keys=spec, schema=schema) as integ:
                            times[kind].append(time.perf_counter() - started)
                            calls[kind].append(CALLS[kind] - before)
                            before = CALLS[kind]
                            for _ in range(READS):
                                await integ.get_credentials(rows[kind])
                            per_reads[kind] = CALLS[kind] - before
                for kind in sources:
                    figures[f"{kind}_open_ms"] = statistics.median(times[kind]) * 1e3
                    figures[f"{kind}_open_calls"] = statistics.median(calls[kind])
                    figures[f"{kind}_calls_per_1000"] = per_reads[kind]
    finally:
        kms.stop()
    base = figures["key_open_ms"]
    print(f"open() and calls per {READS} get_credentials, by key source (median of {OPENS})")
    for kind in sources:
        print(
            f"  {kind:<8} open {figures[f'{kind}_open_ms']:7.1f} ms "
            f"({figures[f'{kind}_open_ms'] / base:5.2f}x)  calls at open "
            f"{figures[f'{kind}_open_calls']:.0f} (first {figures[f'{kind}_first_open_calls']:.0f})"
            f"  per {READS} reads {figures[f'{kind}_calls_per_1000']:.0f}"
        )
    result("key_sources", figures)


if __name__ == "__main__":
    asyncio.run(main())
