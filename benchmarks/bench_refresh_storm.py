"""Refresh storm: 100 concurrent requests with an expired token across 4 processes, ours vs authlib.

The strict loopback authorization server (its own process) rotates the refresh token on
every use and revokes the whole grant when a spent one comes back, as strict providers
do. Each contender gets its own grant. Ours: ``Integrations.authenticated_request`` in
every process, on one database. Baseline: authlib's ``AsyncOAuth2Client`` per process
the way its documentation shows it (``token=`` loaded from a shared table,
``update_token`` saving the new token back, automatic refresh via ``token_endpoint``).

Prints token-endpoint calls, request outcomes, and whether each grant survived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid as uuid_mod
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg
from _common import result, scratch_database

from integrations import Integrations, Provider, generate_key
from tests.oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ServerProcess

PROCESSES = 4
PER_PROCESS = 25
REDIRECT_URI = "http://127.0.0.1:9/callback"
# A real token endpoint takes a few hundred milliseconds; so does this one here.
TOKEN_DELAY = 0.2
TOKENS_TABLE = "authlib_tokens"


def provider(base_url: str) -> Provider:
    return Provider(
        key="loopback",
        name="Loopback",
        auth_type="oauth2",
        authorize_url=f"{base_url}/authorize",
        token_url=f"{base_url}/token",
        userinfo_url=f"{base_url}/userinfo",
        revoke_url=f"{base_url}/revoke",
        scopes=("read",),
        api_hosts=("127.0.0.1",),
    )


# -- children -------------------------------------------------------------------------


async def child_ours(args: argparse.Namespace) -> list[dict[str, Any]]:
    async with Integrations(args.dsn, keys=args.key, providers=[provider(args.base_url)]) as integ:
        await integ.get_integration_by_uuid(args.uuid)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)

        async def one() -> dict[str, Any]:
            try:
                response = await integ.authenticated_request(
                    args.uuid, "GET", f"{args.base_url}/api/resource"
                )
            except Exception as exc:
                return {"status": None, "error": type(exc).__name__}
            return {"status": response.status}

        return list(await asyncio.gather(*(one() for _ in range(args.count))))


async def child_authlib(args: argparse.Namespace) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        # authlib announces a move to httpx2; the documented client is still this one.
        warnings.simplefilter("ignore")
        from authlib.integrations.httpx_client import AsyncOAuth2Client

    db = await asyncpg.connect(args.dsn)
    try:
        raw = await db.fetchval(f"SELECT token::text FROM {TOKENS_TABLE} WHERE name = $1", "bench")
        token = json.loads(raw)

        async def update_token(
            token: dict[str, Any], refresh_token: str | None = None, access_token: str | None = None
        ) -> None:
            await db.execute(
                f"UPDATE {TOKENS_TABLE} SET token = $2::text::jsonb WHERE name = $1",
                "bench",
                json.dumps(dict(token)),
            )

        async with AsyncOAuth2Client(
            client_id=DEFAULT_CLIENT_ID,
            client_secret=DEFAULT_CLIENT_SECRET,
            token=token,
            token_endpoint=f"{args.base_url}/token",
            update_token=update_token,
        ) as client:
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)

            async def one() -> dict[str, Any]:
                try:
                    response = await client.get(f"{args.base_url}/api/resource")
                except Exception as exc:
                    return {"status": None, "error": type(exc).__name__}
                return {"status": response.status_code}

            return list(await asyncio.gather(*(one() for _ in range(args.count))))
    finally:
        await db.close()


def run_child(args: argparse.Namespace) -> None:
    runner = child_ours if args.child == "ours" else child_authlib
    results = asyncio.run(runner(args))
    print(json.dumps(results), flush=True)


# -- parent ---------------------------------------------------------------------------


async def authorize(integ: Integrations, name: str) -> str:
    conn = await integ.add_connection("loopback", name)
    await integ.save_setup(
        conn.uuid, {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    )
    url, _ = await integ.begin_authorization(conn.uuid, REDIRECT_URI)
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as resp:
        query = dict(parse_qsl(urlsplit(resp.headers["Location"]).query))
    await integ.complete_authorization(query["state"], code=query["code"])
    return conn.uuid


def storm(kind: str, dsn: str, key: str, base_url: str, uuid: str) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--dsn",
                dsn,
                "--key",
                key,
                "--base-url",
                base_url,
                "--uuid",
                uuid,
                "--count",
                str(PER_PROCESS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results: list[dict[str, Any]] = []
    for proc in procs:
        assert proc.stdout is not None
        results.extend(json.loads(proc.stdout.readline()))
        proc.wait(timeout=60)
    return results


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    def refreshes(stats: dict[str, Any]) -> int:
        return int(stats["token_calls"].get("refresh_token", 0))

    return {
        "token_calls": refreshes(after) - refreshes(before),
        "grants_revoked": after["grants_revoked"] - before["grants_revoked"],
        "reuse_detected": after["refresh_reuse_detected"] - before["refresh_reuse_detected"],
    }


def summary(results: list[dict[str, Any]]) -> str:
    ok = sum(1 for r in results if r["status"] == 200)
    rejected = sum(1 for r in results if r["status"] == 401)
    errors = len(results) - ok - rejected
    return f"{ok} ok, {rejected} × 401, {errors} errors"


async def still_works_ours(integ: Integrations, base_url: str, uuid: str) -> bool:
    try:
        await integ.refresh_access_token(uuid)
        response = await integ.authenticated_request(uuid, "GET", f"{base_url}/api/resource")
    except Exception:
        return False
    return response.status == 200


async def still_works_authlib(dsn: str, base_url: str) -> bool:
    db = await asyncpg.connect(dsn)
    try:
        token = json.loads(
            await db.fetchval(f"SELECT token::text FROM {TOKENS_TABLE} WHERE name = 'bench'")
        )
    finally:
        await db.close()
    form = {
        "grant_type": "refresh_token",
        "refresh_token": token.get("refresh_token", ""),
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
    }
    async with aiohttp.ClientSession() as http, http.post(f"{base_url}/token", data=form) as resp:
        return resp.status == 200


async def main() -> None:
    key = generate_key()
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    with ServerProcess() as server:
        base_url = server.base_url
        async with (
            scratch_database() as dsn,
            Integrations(dsn, keys=key, providers=[provider(base_url)]) as integ,
        ):
            ours = await authorize(integ, "ours")
            baseline = await authorize(integ, "baseline")
            baseline_tokens = await integ.get_integration(baseline)
            async with integ._repo.connection() as conn:
                await conn.execute(
                    "UPDATE integrations.connections SET value_json = "
                    "jsonb_set(value_json, '{expires_at}', to_jsonb($2::text)) WHERE uuid = $1",
                    uuid_mod.UUID(ours),
                    past,
                )
                await conn.execute(f"CREATE TABLE {TOKENS_TABLE} (name text, token jsonb)")
                await conn.execute(
                    f"INSERT INTO {TOKENS_TABLE} VALUES ('bench', $1::text::jsonb)",
                    json.dumps(
                        {
                            "access_token": baseline_tokens["access_token"],
                            "refresh_token": baseline_tokens["refresh_token"],
                            "token_type": "Bearer",
                            "expires_at": int(time.time()) - 300,
                        }
                    ),
                )
            server.configure(token_delay=TOKEN_DELAY)

            rows = []
            for kind, uuid in (("ours", ours), ("authlib AsyncOAuth2Client", baseline)):
                before = server.stats()
                started = time.perf_counter()
                results = storm("ours" if kind == "ours" else "authlib", dsn, key, base_url, uuid)
                elapsed = time.perf_counter() - started
                change = delta(before, server.stats())
                server.configure(token_delay=0.0)
                survived = (
                    await still_works_ours(integ, base_url, uuid)
                    if kind == "ours"
                    else await still_works_authlib(dsn, base_url)
                )
                server.configure(token_delay=TOKEN_DELAY)
                rows.append((kind, change, summary(results), survived, elapsed))

    print(
        f"Refresh storm: {PROCESSES} processes x {PER_PROCESS} concurrent requests, "
        f"token expired, token endpoint latency {TOKEN_DELAY:g}s, rotating refresh tokens"
    )
    print(f"{'client':<28}{'token calls':>12}{'reuse':>7}{'revoked':>9}  requests")
    for kind, change, outcome, survived, elapsed in rows:
        print(
            f"{kind:<28}{change['token_calls']:>12}{change['reuse_detected']:>7}"
            f"{change['grants_revoked']:>9}  {outcome}; grant survived: "
            f"{'yes' if survived else 'no'} ({elapsed:.2f}s)"
        )
    figures: dict[str, float] = {}
    for kind, change, outcome, survived, _ in rows:
        tag = "ours" if kind == "ours" else "authlib"
        figures[f"{tag}_token_calls"] = float(change["token_calls"])
        figures[f"{tag}_revoked"] = float(change["grants_revoked"])
        figures[f"{tag}_survived"] = 1.0 if survived else 0.0
        figures[f"{tag}_ok"] = float(outcome.split()[0])
        figures[f"{tag}_requests"] = float(PROCESSES * PER_PROCESS)
    result("refresh_storm", figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", choices=["ours", "authlib"])
    parser.add_argument("--dsn")
    parser.add_argument("--key")
    parser.add_argument("--base-url")
    parser.add_argument("--uuid")
    parser.add_argument("--count", type=int, default=PER_PROCESS)
    arguments = parser.parse_args()
    if arguments.child:
        run_child(arguments)
    else:
        asyncio.run(main())
