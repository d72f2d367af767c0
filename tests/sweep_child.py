"""A worker process for the multi-process sweep test: runs the health sweeps on a shared DSN.

Prints one JSON line per sweep it makes (its pid, when the sweep started and finished,
what it checked), and one per check it starts (``check``: the api key, ``at``: when),
until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations import Integrations, SweepReport, Validation
from integrations._probes import CHECK_HOOKS
from tests.sweepkit import HOOK, probe_provider, register_probe


async def main(args: argparse.Namespace) -> None:
    register_probe()
    probe = CHECK_HOOKS[HOOK]

    async def reported(credentials: Mapping[str, Any], deadline: float) -> Validation:
        line = {"pid": os.getpid(), "check": credentials.get("api_key"), "at": time.time()}
        print(json.dumps(line), flush=True)
        return await probe(credentials, deadline)

    CHECK_HOOKS[HOOK] = reported

    def report(sweep: SweepReport) -> None:
        line = {
            "pid": os.getpid(),
            "start": sweep.started_at.timestamp(),
            "end": sweep.finished_at.timestamp(),
            "checked": sweep.checked,
        }
        print(json.dumps(line), flush=True)

    async with Integrations(
        args.dsn, keys=args.key, providers=[probe_provider()], pool_max_size=4
    ) as integ:
        print(json.dumps({"pid": os.getpid(), "ready": True}), flush=True)
        await integ.run_health_sweeps(interval=args.interval, stale_after=0, on_sweep=report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))
