"""authenticated_request traced by the OpenTelemetry SDK (no-op exporters) against untraced,
the HTTP server in another process (so that it does not slow the measuring process)."""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import http_server, interleaved_medians, result, scratch_database

from integrations import Integrations, Provider, generate_key
from integrations import _telemetry as telemetry

try:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
except ImportError:  # pragma: no cover
    sys.exit("needs opentelemetry-sdk: pip install -e '.[dev]'")


REPEATS = 5


class DiscardSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class DiscardMetrics(MetricExporter):
    def export(self, metrics_data: Any, timeout_millis: float = 0, **kwargs: Any) -> Any:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 0) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 0, **kwargs: Any) -> None:
        pass


def using(
    call: Callable[[], Awaitable[object]], *, enabled: bool, instruments: Any = None
) -> Callable[[], Awaitable[object]]:
    """``call`` with telemetry switched as given: off (as without the API installed), the
    API with no SDK configured, or the SDK."""

    async def run() -> object:
        telemetry.ENABLED = enabled  # type: ignore[misc]
        telemetry._instruments = instruments
        return await call()

    return run


async def main() -> None:
    provider = Provider(key="bench", name="Bench", auth_type="api_key", api_hosts=("127.0.0.1",))

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DiscardSpans()))
    reader = PeriodicExportingMetricReader(DiscardMetrics(), export_interval_millis=60_000)
    meter_provider = MeterProvider(metric_readers=[reader])
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    sdk = telemetry.instruments(tracer_provider, meter_provider)
    api_only = telemetry.instruments(NoOpTracerProvider(), NoOpMeterProvider())
    try:
        async with (
            http_server() as url,
            scratch_database() as dsn,
            aiohttp.ClientSession() as session,
            Integrations(dsn, keys=generate_key(), providers=[provider], http=session) as integ,
        ):
            conn = await integ.add_connection("bench", "default")
            await integ.save_setup(conn.uuid, {"api_key": "sk-bench-0123456789abcdef"})

            async def request() -> object:
                return await integ.authenticated_request(conn.uuid, "GET", url)

            contenders = {
                "no SDK configured": using(request, enabled=True, instruments=api_only),
                "SDK, no-op exporters": using(request, enabled=True, instruments=sdk),
                "without opentelemetry": using(request, enabled=False),
            }
            # Several interleaved runs: the medians of their medians and of their ratios.
            runs = [await interleaved_medians(contenders, rounds=500) for _ in range(REPEATS)]
            medians = {name: statistics.median(r[name] for r in runs) for name in contenders}
            sdk_ratio = statistics.median(
                r["SDK, no-op exporters"] / r["no SDK configured"] for r in runs
            )
            absent_ratio = statistics.median(
                r["without opentelemetry"] / r["no SDK configured"] for r in runs
            )
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()
    base = medians["no SDK configured"]
    print("authenticated_request with tracing (SDK, batch span processor, no-op exporters)")
    print("against the same call with no SDK configured (API installed, no-op providers)")
    for name, value in medians.items():
        print(f"  {name:<22} median {value * 1e6:8.1f} µs   ratio {value / base:5.3f}x")
    overhead = medians["SDK, no-op exporters"] - base
    print(f"  tracing overhead: {overhead * 1e6:+.1f} µs per request")
    print(
        f"  median ratio of {REPEATS} runs: SDK {sdk_ratio:.3f}x, "
        f"without the API {absent_ratio:.3f}x"
    )
    result(
        "tracing",
        {
            "base_us": base * 1e6,
            "sdk_us": medians["SDK, no-op exporters"] * 1e6,
            "absent_us": medians["without opentelemetry"] * 1e6,
            "sdk_ratio": sdk_ratio,
            "absent_ratio": absent_ratio,
            "repeats": float(REPEATS),
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
