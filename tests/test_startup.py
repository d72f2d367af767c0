"""Start-up stays light: `import integrations` and `integrations --help` load no heavy module
(their times are measured in benchmarks/bench_startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules that no start-up needs: the console's web stack, the CLI's tables, AWS signing,
# tracing, the catalogue's models.
NEVER_AT_IMPORT = (
    "rich",
    "starlette",
    "jinja2",
    "uvicorn",
    "botocore",
    "opentelemetry",
    "aiosmtplib",
    "integrations._catalogue",
    "integrations.web",
)
# What `import integrations` and `--help` need none of either: the HTTP client, the
# driver, the models, the crypto, the library's services, the event loop.
NOT_FOR_HELP = (
    *NEVER_AT_IMPORT,
    "aiohttp",
    "asyncpg",
    "pydantic",
    "authlib",
    "cryptography",
    "integrations._integrations",
    "integrations._repository",
    "integrations._events",
    "integrations._audit",
    "asyncio",
)


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def loaded(found: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in found or any(m.startswith(n + ".") for m in found))


def test_import_integrations_loads_no_heavy_module() -> None:
    assert loaded(modules_after("import integrations"), NOT_FOR_HELP) == []


@pytest.mark.parametrize(
    "code",
    ["from integrations import Integrations", "from integrations import *"],
    ids=["Integrations", "star"],
)
def test_the_library_loads_neither_web_nor_cli_nor_extras(code: str) -> None:
    found = modules_after(code)
    assert "aiohttp" in found  # the names really were imported
    assert loaded(found, NEVER_AT_IMPORT) == []


def test_help_loads_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from integrations.cli import main\n"
        "sys.argv = ['integrations', '--help']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
    )
    found = modules_after(code)
    assert "click" in found
    assert loaded(found, NOT_FOR_HELP) == []


def test_a_command_still_finds_what_it_imports_late() -> None:
    # `keys generate` needs cryptography, imported when the command runs.
    done = subprocess.run(
        [sys.executable, "-m", "integrations", "keys", "generate"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 20
