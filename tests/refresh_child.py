"""A worker process for the multi-process refresh tests: its own Integrations on the shared DSN.

Prints ``ready`` once open, waits for a line on stdin (the start signal shared by every
worker), makes ``--count`` concurrent calls and prints one JSON line with the outcome (and
how long each call took, in ``waits``). ``--stop-at`` makes the process stop itself
(SIGSTOP) at a point of its first refresh, for the test to kill it or let it go on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations import Integrations, IntegrationsError
from tests.oauthkit import loopback_provider

#: Where ``--stop-at`` stops: the refresher's method entered at that point.
STOP_POINTS = {
    # The lease is taken and confirmed; the sending mark and the request are next.
    "before": "_token_call",
    # The token endpoint answered; the write of its tokens is next.
    "answer": "_store",
}


def stop_once_at(point: str) -> None:
    from integrations._tokens import Refresher

    name = STOP_POINTS[point]
    original = getattr(Refresher, name)
    stopped: list[bool] = []

    async def stopping(self: Refresher, *args: Any, **kwargs: Any) -> Any:
        if not stopped:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return await original(self, *args, **kwargs)

    setattr(Refresher, name, stopping)


async def main(args: argparse.Namespace) -> None:
    if args.stop_at is not None:
        stop_once_at(args.stop_at)
    provider = loopback_provider(args.base_url, rotates_refresh_tokens=not args.no_rotate)
    async with Integrations(
        args.dsn,
        keys=args.key,
        providers=[provider],
        lock_timeout=args.lock_timeout,
        token_backoff=0.01,
        refresh_lease=args.lease,
        token_write_retry=args.write_retry,
        token_timeout=args.token_timeout,
        refresh_takeover=args.takeover,
        statement_cache_size=args.statement_cache_size,
        listen_dsn=args.listen_dsn,
    ) as integ:
        # Warm the pool and the HTTP session so the start signal releases real work only.
        await integ.get_integration_by_uuid(args.uuid)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        started = time.monotonic()

        waits: list[float] = []

        async def one() -> dict[str, Any]:
            began = time.monotonic()
            try:
                return await call()
            finally:
                waits.append(time.monotonic() - began)

        async def call() -> dict[str, Any]:
            try:
                if args.mode == "request":
                    response = await integ.authenticated_request(
                        args.uuid, "GET", f"{args.base_url}/api/resource"
                    )
                    body = response.json() if response.ok else {}
                    return {"status": response.status, "token_id": body.get("token_id")}
                if args.mode == "refresh":
                    await integ.refresh_access_token(args.uuid)
                else:
                    await integ.access_token(args.uuid)
                return {"status": 200}
            except IntegrationsError as exc:
                return {"status": None, "error": exc.code}

        results = await asyncio.gather(*(one() for _ in range(args.count)))
        print(
            json.dumps({"results": results, "elapsed": time.monotonic() - started, "waits": waits}),
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--write-retry", type=float, default=60.0)
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--mode", choices=["request", "access_token", "refresh"], default="request")
    parser.add_argument("--count", type=int, default=25)
    parser.add_argument("--lock-timeout", type=float, default=30.0)
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--statement-cache-size", type=int, default=None)
    parser.add_argument("--listen-dsn", default=None)
    parser.add_argument("--token-timeout", type=float, default=10.0)
    parser.add_argument("--takeover", choices=["refresh", "reauthorize"], default="refresh")
    parser.add_argument("--stop-at", choices=sorted(STOP_POINTS), default=None)
    asyncio.run(main(parser.parse_args()))
