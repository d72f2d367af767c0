"""Every code block in README.md and docs/ runs as written or is visibly marked a fragment.

The conventions are described in CONTRIBUTING.md, "Docs snippets".
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from .conftest import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<marker>fragment|snippet:\s*[\w-]+)\s*-->\s*$")
# Languages whose blocks are shown, not run: shell commands, output, diagrams, markup.
SHOWN = {"bash", "sh", "shell", "console", "text", "mermaid", "markdown", "toml", "ini", "yaml"}
MARKERS = {"fragment", "snippet: fake-provider", "snippet: shell"}
FAKES = Path(__file__).resolve().parent / "docs_fakes.py"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    marker: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marked = MARKER.match(before)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        marker = None if marked is None else re.sub(r"\s+", " ", marked["marker"])
        found.append(Block(path, i + 1, opening["lang"].lower(), marker, "\n".join(body) + "\n"))
        i = j + 1
    return found


BLOCKS = [block for path in DOC_FILES for block in blocks_of(path)]


def by_kind(*langs: str, fragments: bool) -> list[object]:
    """Blocks in these languages: only the fragments, or only the others."""
    chosen = [b for b in BLOCKS if b.lang in langs and (b.marker == "fragment") == fragments]
    return [pytest.param(b, id=b.id) for b in chosen]


def test_the_docs_have_runnable_snippets() -> None:
    # The collector itself can fail: an empty list would make every check below vacuous.
    assert len(DOC_FILES) > 5
    assert sum(b.lang == "python" and b.marker is None for b in BLOCKS) >= 5


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_every_block_has_a_known_language_and_marker(block: Block) -> None:
    assert block.lang, f"{block.id}: give the block a language (```text for output)"
    assert block.lang in SHOWN | {"python", "sql", "json"}, f"{block.id}: unknown language"
    assert block.marker is None or block.marker in MARKERS, f"{block.id}: unknown marker"
    if block.marker == "fragment":
        # The HTML comment is invisible once rendered; the first line tells the reader.
        comment = "--" if block.lang == "sql" else "#"
        assert block.code.startswith(f"{comment} fragment"), (
            f"{block.id}: a fragment's first line is a '{comment} fragment: ...' comment "
            "saying what the reader must supply"
        )


@pytest.mark.parametrize("block", by_kind("python", fragments=True))
def test_python_fragments_parse(block: Block) -> None:
    # Fragments may await at top level (they are shown as part of an async function).
    compile(block.code, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def run_script(block: Block, fresh_db: str, tmp_path: Path, *, fakes: bool) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    env = {
        **os.environ,
        "INTEGRATIONS_DSN": fresh_db,
        "INTEGRATIONS_KEYS": TEST_KEY,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(FAKES.parent)]),
    }
    if fakes:
        command = [sys.executable, "-W", "error", "-c", _WITH_FAKES, str(script)]
    else:
        command = [sys.executable, "-W", "error", str(script)]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"


_WITH_FAKES = (
    "import runpy, sys, docs_fakes\n"
    "with docs_fakes.fake_services():\n"
    "    runpy.run_path(sys.argv[1], run_name='__main__')\n"
)


@pytest.mark.parametrize("block", by_kind("python", fragments=False))
def test_python_snippet_runs_as_written(block: Block, fresh_db: str, tmp_path: Path) -> None:
    run_script(block, fresh_db, tmp_path, fakes=block.marker == "snippet: fake-provider")


@pytest.mark.parametrize("block", by_kind("sql", fragments=False))
async def test_sql_snippet_runs_on_a_migrated_database(block: Block, fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute(block.code)
    finally:
        await conn.close()


@pytest.mark.parametrize("block", by_kind("json", fragments=False))
def test_json_snippet_parses(block: Block) -> None:
    json.loads(block.code)


@pytest.mark.parametrize("block", by_kind("bash", "sh", "shell", fragments=False))
def test_shell_snippet_is_valid_and_runs_when_marked(
    block: Block, fresh_db: str, tmp_path: Path
) -> None:
    subprocess.run(["bash", "-n"], input=block.code, text=True, check=True)
    if block.marker != "snippet: shell":
        return
    env = {
        **os.environ,
        "INTEGRATIONS_DSN": fresh_db,
        "INTEGRATIONS_KEYS": TEST_KEY,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"


MEASURED = re.compile(r"\d[\d,.]*\s?(?:ms|µs|rows/s)\b|\b\d+(?:\.\d+)?x\b")


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.name) for p in DOC_FILES if p.name != "benchmarks.md"]
)
def test_measured_figures_live_only_in_benchmarks(path: Path) -> None:
    # One source for every figure: other pages link to docs/benchmarks.md.
    found = MEASURED.findall(path.read_text(encoding="utf-8"))
    assert found == [], f"{path.name}: move {found} to docs/benchmarks.md and link to it"


def test_the_figures_check_sees_figures() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert len(MEASURED.findall(text)) > 5


def test_the_readme_quickstart_runs_on_a_database_and_says_what_a_dsn_needs(
    fresh_db: str,
) -> None:
    script = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATIONS_")}
    env["INTEGRATIONS_DSN"] = fresh_db
    run = [sys.executable, str(script)]
    keyless = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert keyless.returncode == 1
    assert "INTEGRATIONS_KEYS" in keyless.stderr and "Traceback" not in keyless.stderr
    env["INTEGRATIONS_KEYS"] = TEST_KEY
    for _ in range(2):  # it starts from a clean slate each time
        done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "removed   -> get_credentials now raises 'deleted'" in done.stdout
