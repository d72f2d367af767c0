"""OpenTelemetry spans and metrics, read back through the SDK's in-memory exporters."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aioresponses import aioresponses

from integrations import HostNotAllowed, Integrations, ReauthRequired, RequestFailed
from integrations import _telemetry as telemetry

from .conftest import TEST_KEY, save_and_settle, store_setup
from .oauth_server import OAuthTestServer
from .oauthkit import connect, open_integrations

pytest.importorskip("opentelemetry.sdk", reason="needs the 'otel' extra and the SDK")

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

OPENAI_MODELS = "https://api.openai.com/v1/models"
API_KEY = "sk-MARKER-otel-apikey-5Hd2Qw"
QUERY_MARKER = "MARKER-in-a-query-8Lm3"


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        found = list(self.spans.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found += [(dict(p.attributes or {}), p) for p in item.data.data_points]
        return found

    def total(self, metric: str, **match: Any) -> float:
        """A counter's value (or a histogram's count) over the points whose attributes
        include ``match`` (dots in attribute names written as ``__``)."""
        wanted = {k.replace("__", "."): v for k, v in match.items()}
        total = 0.0
        for attributes, point in self.points(metric):
            if all(attributes.get(k) == v for k, v in wanted.items()):
                total += point.count if hasattr(point, "count") else point.value
        return total


_PROVIDERS: Otel | None = None


@pytest.fixture
def otel() -> Iterator[Otel]:
    """The SDK configured once per process (the global providers can be set only once);
    spans are cleared for each test, metrics are cumulative: tests compare before/after."""
    global _PROVIDERS
    if _PROVIDERS is None:
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        trace.set_tracer_provider(tracer_provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        _PROVIDERS = Otel(spans, reader)
    _PROVIDERS.spans.clear()
    yield _PROVIDERS


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


def attribute_texts(otel: Otel) -> list[str]:
    """Every attribute value of every finished span and metric point, and span names."""
    texts: list[str] = []
    for span in otel.finished():
        texts.append(span.name)
        texts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
    data = otel.reader.get_metrics_data()
    if data is not None:
        texts.append(data.to_json())
    return texts


def assert_no_secret(otel: Otel, secrets: list[str]) -> None:
    texts = "\n".join(attribute_texts(otel))
    assert texts, "nothing was recorded"
    for secret in secrets:
        assert secret not in texts


async def stored_secrets(integ: Integrations, uuid: str) -> list[str]:
    creds = await integ.get_credentials(uuid)
    return [
        str(creds[k])
        for k in ("access_token", "refresh_token", "client_secret", "api_key")
        if creds.get(k)
    ]


async def test_an_authenticated_request_is_an_http_client_span(
    fresh_db: str, server: OAuthTestServer, otel: Otel
) -> None:
    async with open_integrations(fresh_db, server.base_url) as integ:
        uuid = await connect(integ)
        secrets = await stored_secrets(integ, uuid)
        server.expire_access_tokens()
        refreshes = {
            "integrations__provider": "loopback",
            "integrations__grant_type": "refresh_token",
            "integrations__outcome": "ok",
        }
        before = otel.total("integrations.token.requests", **refreshes)
        callers_before = otel.total("integrations.token.callers")
        otel.spans.clear()
        url = f"{server.api_url}/me?key={QUERY_MARKER}"
        response = await integ.authenticated_request(uuid, "get", url)
        assert response.status == 200
        secrets += await stored_secrets(integ, uuid)

    [request] = otel.finished("GET")
    assert request.kind is trace.SpanKind.CLIENT
    attributes = dict(request.attributes or {})
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    assert attributes == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": port,
        "url.scheme": "http",
        "integrations.provider": "loopback",
        "integrations.connection.uuid": uuid,
        "http.response.status_code": 200,
        # The first answer was 401 (the token had expired): refreshed, sent once more.
        "integrations.attempts": 2,
        "http.request.resend_count": 1,
    }
    # The token request it made is its child, on the same trace.
    [token] = otel.finished("integrations.token_request")
    assert token.parent is not None and token.parent.span_id == request.context.span_id
    assert token.kind is trace.SpanKind.CLIENT
    token_attributes = dict(token.attributes or {})
    assert token_attributes["integrations.grant_type"] == "refresh_token"
    assert token_attributes["integrations.outcome"] == "ok"
    assert token_attributes["integrations.provider"] == "loopback"
    assert token_attributes["http.request.method"] == "POST"
    assert "error.type" not in token_attributes

    assert otel.total("integrations.token.requests", **refreshes) - before == 1
    assert otel.total("integrations.token.callers") - callers_before == 1
    durations = [a for a, _ in otel.points("http.client.request.duration")]
    assert {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": port,
        "url.scheme": "http",
        "integrations.provider": "loopback",
        "http.response.status_code": 200,
    } in durations
    assert otel.total("db.client.connection.wait_time") >= 1
    assert_no_secret(otel, [*secrets, QUERY_MARKER])


async def test_concurrent_callers_served_by_one_token_request_are_counted(
    fresh_db: str, server: OAuthTestServer, otel: Otel
) -> None:
    async with open_integrations(fresh_db, server.base_url) as integ:
        uuid = await connect(integ)
        server.config.token_delay = 0.2
        before = [p.sum for _, p in otel.points("integrations.token.callers")]
        tokens = await asyncio.gather(*(integ.refresh_access_token(uuid) for _ in range(10)))
        assert len(set(tokens)) == 1
    [(_, point)] = otel.points("integrations.token.callers")
    assert point.sum - sum(before) == 10


async def test_http_retries_show_as_attempts_and_error_statuses_as_error_type(
    integ: Integrations, otel: Otel
) -> None:
    conn = await integ.add_connection("openai", "default")
    await store_setup(integ, conn.uuid, {"api_key": API_KEY})
    with aioresponses() as mock:
        mock.get(OPENAI_MODELS, status=503, headers={"Retry-After": "0"})
        mock.get(OPENAI_MODELS, status=200, payload={"data": []})
        assert (await integ.authenticated_request(conn.uuid, "GET", OPENAI_MODELS)).ok
        mock.get(OPENAI_MODELS, status=404)
        assert (await integ.authenticated_request(conn.uuid, "GET", OPENAI_MODELS)).status == 404
    ok, missing = otel.finished("GET")
    assert ok.attributes is not None and missing.attributes is not None
    assert ok.attributes["integrations.attempts"] == 2
    assert ok.attributes["http.request.resend_count"] == 1
    assert ok.attributes["server.address"] == "api.openai.com"
    assert ok.attributes["server.port"] == 443
    assert "error.type" not in ok.attributes
    assert missing.attributes["error.type"] == "404"
    assert missing.status.status_code is trace.StatusCode.ERROR
    assert ok.status.status_code is trace.StatusCode.UNSET
    # Durations in seconds fall in second-scale buckets, not the SDK's default 0, 5, 10...
    [(_, point), *_] = otel.points("http.client.request.duration")
    assert tuple(point.explicit_bounds)[:3] == (0.005, 0.01, 0.025)
    assert missing.attributes["integrations.attempts"] == 1
    assert "http.request.resend_count" not in missing.attributes
    assert_no_secret(otel, [API_KEY])


async def test_a_url_path_and_query_stay_out_of_spans_and_logs(
    integ: Integrations, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conn = await integ.add_connection("openai", "default")
    await store_setup(integ, conn.uuid, {"api_key": API_KEY})
    url = "https://api.openai.com/v1/users/MARKER-PATH/export?sig=MARKER-QUERY"
    with aioresponses() as mock:
        mock.get(url, status=503, headers={"Retry-After": "0"})
        mock.get(url, exception=aiohttp.ClientConnectionError("reset"))
        mock.get(url, exception=aiohttp.ClientConnectionError("reset"))
        with pytest.raises(RequestFailed):
            await integ.authenticated_request(conn.uuid, "GET", url, max_attempts=3)
        mock.add(url, "PROPFIND", status=207)
        await integ.authenticated_request(conn.uuid, "PROPFIND", url)
    spans = otel.finished()
    assert any(s.status.status_code is trace.StatusCode.ERROR for s in spans)
    [other] = [
        s for s in spans if s.attributes and s.attributes.get("http.request.method") == "_OTHER"
    ]
    assert other.name == "HTTP"
    assert other.attributes is not None
    assert other.attributes["http.request.method_original"] == "PROPFIND"
    texts = "\n".join(attribute_texts(otel))
    texts += "\n".join(str(s.status.description) for s in spans)
    texts += "\n".join(r.getMessage() for r in caplog.records)
    assert "http_retry" in {getattr(r, "integrations_event_kind", None) for r in caplog.records}
    assert "MARKER-PATH" not in texts and "MARKER-QUERY" not in texts


async def test_a_request_refused_before_sending_records_the_error_type(
    integ: Integrations, otel: Otel
) -> None:
    conn = await integ.add_connection("openai", "default")
    await store_setup(integ, conn.uuid, {"api_key": API_KEY})
    with pytest.raises(HostNotAllowed):
        await integ.authenticated_request(conn.uuid, "GET", "https://collect.example.net/x")
    [span] = otel.finished("GET")
    assert span.attributes is not None
    assert span.attributes["error.type"] == HostNotAllowed.code
    assert span.attributes["server.address"] == "collect.example.net"
    assert span.attributes["integrations.attempts"] == 0
    assert span.status.status_code is trace.StatusCode.ERROR


async def test_a_failed_refresh_records_its_outcome_and_oauth_error(
    fresh_db: str, server: OAuthTestServer, otel: Otel
) -> None:
    async with open_integrations(fresh_db, server.base_url) as integ:
        uuid = await connect(integ)
        secrets = await stored_secrets(integ, uuid)
        server.config.force_invalid_client = True
        otel.spans.clear()
        before = otel.total(
            "integrations.token.requests",
            integrations__provider="loopback",
            integrations__outcome="reauth_required",
        )
        with pytest.raises(ReauthRequired):
            await integ.refresh_access_token(uuid)
    [span] = otel.finished("integrations.token_request")
    attributes = dict(span.attributes or {})
    assert attributes["integrations.outcome"] == "reauth_required"
    assert attributes["integrations.error_code"] == "reauth_required"
    assert attributes["integrations.oauth_error"] == "invalid_client"
    assert attributes["error.type"] == "reauth_required"
    assert attributes["http.response.status_code"] == 401
    assert span.status.status_code is trace.StatusCode.ERROR
    after = otel.total(
        "integrations.token.requests",
        integrations__provider="loopback",
        integrations__outcome="reauth_required",
    )
    assert after - before == 1
    assert_no_secret(otel, secrets)


async def test_checks_are_spans_and_counted_by_outcome(integ: Integrations, otel: Otel) -> None:
    conn = await integ.add_connection("openai", "default")
    await store_setup(integ, conn.uuid, {"api_key": API_KEY})

    def count(outcome: str) -> float:
        return otel.total(
            "integrations.checks", integrations__provider="openai", integrations__outcome=outcome
        )

    ok, failed = count("ok"), count("failed")
    with aioresponses() as mock:
        mock.get(OPENAI_MODELS, status=200, payload={"data": []})
        assert (await integ.validate_connection(conn.uuid)).ok
        mock.get(OPENAI_MODELS, status=401, payload={"error": {"message": API_KEY}})
        assert not (await integ.validate_connection(conn.uuid)).ok
    assert (count("ok") - ok, count("failed") - failed) == (1, 1)
    spans = otel.finished("integrations.check")
    assert [dict(s.attributes or {}) for s in spans] == [
        {
            "integrations.provider": "openai",
            "integrations.connection.uuid": conn.uuid,
            "integrations.outcome": outcome,
        }
        for outcome in ("ok", "failed")
    ]
    assert_no_secret(otel, [API_KEY])


async def test_key_rotation_is_a_span_with_its_counts(fresh_db: str, otel: Otel) -> None:
    from integrations import generate_key

    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        for name in ("a", "b", "c"):
            conn = await integ.add_connection("openai", name)
            await store_setup(integ, conn.uuid, {"api_key": API_KEY})
    async with Integrations(fresh_db, keys=[generate_key(), TEST_KEY]) as integ:
        result = await integ.rotate_keys(batch_size=2)
    [span] = otel.finished("integrations.rotate_keys")
    assert dict(span.attributes or {}) == {
        "integrations.rotation.rows": 3,
        "integrations.rotation.scanned": result.scanned,
        "integrations.rotation.batches": result.batches,
        "integrations.rotation.skipped": 0,
    }
    assert result.rotated == 3


async def test_dropped_events_and_resyncs_are_counted(
    integ: Integrations, db: asyncpg.Connection, otel: Otel
) -> None:
    full = otel.total("integrations.events.dropped", integrations__reason="queue_full")
    malformed = otel.total("integrations.events.dropped", integrations__reason="malformed")
    resyncs = otel.total("integrations.events.resyncs")
    async with integ.subscribe(maxsize=1) as sub:
        for name in ("a", "b", "c"):
            await integ.add_connection("openai", name)
        await db.execute("SELECT pg_notify('integrations_events', 'not json')")
        listeners = await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %'"
        )
        for _ in range(200):
            if sub.dropped == 2 and integ.event_stats.malformed == 1:
                break
            await asyncio.sleep(0.02)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", listeners[0]["pid"])
        for _ in range(250):
            if integ.event_stats.reconnects == 1:
                break
            await asyncio.sleep(0.02)
    assert otel.total("integrations.events.dropped", integrations__reason="queue_full") - full >= 2
    assert otel.total("integrations.events.dropped", integrations__reason="malformed") == (
        malformed + 1
    )
    assert otel.total("integrations.events.resyncs") - resyncs == 1


async def test_cache_lookups_are_counted_as_hits_and_misses(fresh_db: str, otel: Otel) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        conn = await integ.add_connection("openai", "default")
        await save_and_settle(integ, conn.uuid, {"api_key": "sk-cache-0123456789abcdef"})
        hits = otel.total("integrations.cache.lookups", integrations__cache__result="hit")
        misses = otel.total("integrations.cache.lookups", integrations__cache__result="miss")
        for _ in range(3):  # a miss that fills the cache, then two hits
            await integ.get_credentials(conn.uuid)
    assert otel.total("integrations.cache.lookups", integrations__cache__result="hit") == hits + 2
    assert otel.total("integrations.cache.lookups", integrations__cache__result="miss") == (
        misses + 1
    )


def test_only_the_grant_type_is_read_from_a_token_request_body() -> None:
    body = "grant_type=refresh_token&refresh_token=MARKER-rt&client_secret=MARKER-cs"
    assert telemetry.grant_type_of(body) == "refresh_token"
    assert telemetry.grant_type_of(body.encode()) == "refresh_token"
    assert telemetry.grant_type_of("grant_type=%0Aevil%20text") == "unknown"
    assert telemetry.grant_type_of(None) == "unknown"


async def test_without_the_api_nothing_is_recorded_and_requests_still_work(
    integ: Integrations, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "ENABLED", False)
    conn = await integ.add_connection("openai", "default")
    await store_setup(integ, conn.uuid, {"api_key": API_KEY})
    with aioresponses() as mock:
        mock.get(OPENAI_MODELS, status=200, payload={"data": []})
        assert (await integ.authenticated_request(conn.uuid, "GET", OPENAI_MODELS)).ok
        mock.get(OPENAI_MODELS, status=200, payload={"data": []})
        assert (await integ.validate_connection(conn.uuid)).ok
    assert otel.finished() == []


NO_OTEL_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys
    # opentelemetry absent: the import system finds nothing under that name.
    sys.modules["opentelemetry"] = None
    assert importlib.util.find_spec("opentelemetry") is None
    from aioresponses import aioresponses
    import integrations
    from integrations import _telemetry

    async def main(dsn, key):
        async with integrations.Integrations(dsn, keys=key) as integ:
            conn = await integ.add_connection("openai", "default")
            await integ.save_setup(conn.uuid, {"api_key": "sk-test-123456789"})
            url = "https://api.openai.com/v1/models"
            with aioresponses() as mock:
                mock.get(url, status=200, payload={"data": []})
                response = await integ.authenticated_request(conn.uuid, "GET", url)
                mock.get(url, status=200, payload={"data": []})
                check = await integ.validate_connection(conn.uuid)
            _telemetry.record_cache(True)
            return response.status, check.ok

    status, ok = asyncio.run(main(sys.argv[1], sys.argv[2]))
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m])
    print(json.dumps({"enabled": _telemetry.ENABLED, "status": status, "ok": ok,
                      "loaded": loaded}))
    """
)


def test_without_opentelemetry_nothing_of_it_is_imported(fresh_db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_OTEL_SCRIPT, fresh_db, TEST_KEY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"enabled": False, "status": 200, "ok": True, "loaded": []}


def test_importing_the_package_imports_no_opentelemetry_module_even_when_installed() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, integrations, integrations._telemetry as t; "
            "print(t.ENABLED, any(m.startswith('opentelemetry') for m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


async def test_a_health_sweep_is_a_span_with_its_checks_as_children_and_is_counted(
    fresh_db: str, otel: Otel
) -> None:
    from .sweepkit import probe_provider, register_probe

    register_probe()
    sweeps = otel.total("integrations.sweeps")
    failed = otel.total(
        "integrations.sweep.jobs", integrations__job="check", integrations__outcome="failed"
    )
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        for name, key in (("a", API_KEY), ("b", "bad-" + API_KEY)):
            conn = await integ.add_connection("probe", name)
            await store_setup(integ, conn.uuid, {"api_key": key})
        swept = asyncio.Event()
        task = asyncio.create_task(
            integ.run_health_sweeps(interval=30, stale_after=0, on_sweep=lambda _: swept.set())
        )
        await asyncio.wait_for(swept.wait(), 20)
        task.cancel()
        await asyncio.wait({task})
    [sweep] = otel.finished("integrations.health_sweep")
    assert dict(sweep.attributes or {}) == {
        "integrations.sweep.examined": 2,
        "integrations.sweep.checked": 2,
        "integrations.sweep.check_failures": 1,
        "integrations.sweep.refreshed": 0,
        "integrations.sweep.refresh_failures": 0,
        "integrations.sweep.errors": 0,
    }
    checks = otel.finished("integrations.check")
    assert len(checks) == 2
    assert all(c.parent is not None and c.parent.span_id == sweep.context.span_id for c in checks)
    assert otel.total("integrations.sweeps") - sweeps == 1
    assert (
        otel.total(
            "integrations.sweep.jobs", integrations__job="check", integrations__outcome="failed"
        )
        - failed
        == 1
    )
    assert_no_secret(otel, [API_KEY])


def test_url_attributes_are_the_origin_alone_and_the_same_cached_or_parsed() -> None:
    urls = [
        "https://api.example.com/v1/bot123:SECRET/send?key=SECRET",
        "HTTPS://Api.Example.com:8443/x",
        "https://user:SECRET@api.example.com/x",
        "http://h.example\\@evil.example/",
        "http://[::1]:9/x#frag",
        "not a url",
    ]
    for _ in range(2):  # the second round is served from the origins kept
        for url in urls:
            got = telemetry._url_attributes(url)
            assert got == telemetry._parse_url_attributes(url)
            assert "SECRET" not in repr(got)
    assert not any("SECRET" in key or "/v1" in key for key in telemetry._ORIGINS)
