"""Mutation testing of the security and concurrency modules, run by ``nox -s mutants``.

For each module of ``mutants/modules.toml`` (or those named on the command line), cosmic-ray
makes the module's mutants one at a time and runs tests against each. A surviving mutant must
be listed as accepted (an equivalent mutant, with its reason), or the run fails. Prints each
module's score (killed / mutants that ran) and writes the survivors to
``mutants/last-run/<module>.txt``.

Making every mutant run all of its module's test files takes days on a small machine, so
each mutant runs only what can kill it, found from one measured run of those files:

- a mutant inside a type annotation is not run: every module has
  ``from __future__ import annotations``, so annotations are never evaluated;
- a mutant on a line that no test executes survives without a run (nothing can see it);
- otherwise the tests that executed the mutated statement run first, fail-fast; when they
  pass, the module's whole test files run before the mutant is called a survivor. A line
  executed only outside any test (import time, fixtures, a subprocess) runs the whole files.

So a killed mutant was killed by a failing test, and a survivor passed every test file of
its module.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "mutants" / "modules.toml"
LAST_RUN = ROOT / "mutants" / "last-run"
#: Seconds one mutant may take in all before it counts as killed (a hang is caught).
TIMEOUT = 600
#: Seconds one test may take under a mutant (pytest-timeout) before it fails.
TEST_TIMEOUT = 60
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0"]
PYTEST += [f"--timeout={TEST_TIMEOUT}"]


def _key(path: Path, operator: str, line: int) -> tuple[str, str]:
    """A survivor by operator and the stripped source line: stable when lines move."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return operator, lines[line - 1].strip() if 0 < line <= len(lines) else ""


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions, cosmic-ray's (line, column) form, of every annotation."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        found: list[ast.expr | None] = []
        if isinstance(node, ast.arg):
            found.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        for ann in found:
            if ann is not None and ann.end_lineno is not None and ann.end_col_offset is not None:
                spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return spans


def _statement_lines(source: str) -> dict[int, tuple[int, int]]:
    """For each line, the first and last line of the innermost statement holding it."""
    best: dict[int, tuple[int, int]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.stmt) or node.end_lineno is None:
            continue
        # A compound statement's own lines are its header, up to its body.
        body = getattr(node, "body", None)
        last = node.end_lineno
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            last = max(node.lineno, body[0].lineno - 1)
        for line in range(node.lineno, last + 1):
            old = best.get(line)
            if old is None or old[1] - old[0] >= last - node.lineno:
                best[line] = (node.lineno, last)
    return best


def _nodeid(context: str, test_files: list[str]) -> str | None:
    """The test a coverage context names, if it is one of these files'."""
    return context if context.split("::")[0] in test_files else None


def _coverage_map(module: dict[str, object], workdir: Path) -> Path:
    """Run the module's tests once under coverage; write which tests execute which line."""
    path = str(module["path"])
    tests = [str(t) for t in module["tests"]]  # type: ignore[attr-defined]
    data = workdir / "coverage.data"
    rc = workdir / "coveragerc"
    rc.write_text(
        "[run]\n"
        f"data_file = {data}\n"
        f"include = {ROOT / path}\n"
        "parallel = true\n"
        "patch = subprocess\n",
        encoding="utf-8",
    )
    for old in workdir.glob("coverage.data*"):
        old.unlink()
    # Each test's lines under its node id: the plugin scripts/mutants_contexts.py.
    env = dict(os.environ, COVERAGE_RCFILE=str(rc), PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest"]
    cmd += [*PYTEST[3:], "-p", "mutants_contexts", *tests]
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{path}: its tests fail without a mutant; fix them first")
    subprocess.run(
        [sys.executable, "-m", "coverage", "combine", f"--rcfile={rc}", "-q"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    import coverage  # installed by the nox session only

    covdata = coverage.CoverageData(basename=str(data))
    covdata.read()
    by_line: dict[int, list[str]] = {}
    for measured in covdata.measured_files():
        if Path(measured).resolve() == (ROOT / path).resolve():
            for line, contexts in covdata.contexts_by_lineno(measured).items():
                by_line[line] = sorted(set(contexts))
    source = (ROOT / path).read_text(encoding="utf-8")
    out = workdir / "map.json"
    out.write_text(
        json.dumps(
            {
                "path": path,
                "tests": tests,
                "source": source,
                "by_line": {str(k): v for k, v in by_line.items()},
                "statements": {str(k): v for k, v in _statement_lines(source).items()},
            }
        ),
        encoding="utf-8",
    )
    return out


def _test_one(map_file: Path) -> int:
    """Cosmic-ray's test command: run what can kill the mutant now in the module's file."""
    cmap = json.loads(map_file.read_text(encoding="utf-8"))
    before = cmap["source"].splitlines()
    after = (ROOT / cmap["path"]).read_text(encoding="utf-8").splitlines()
    changed: set[int] = set()
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag != "equal":
            changed.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    lines: set[int] = set()
    for line in changed:
        first, last = cmap["statements"].get(str(line), (line, line))
        lines.update(range(first, last + 1))
    contexts = {c for line in lines for c in cmap["by_line"].get(str(line), [])}
    files = cmap["tests"]
    if not contexts:
        print(f"lines {sorted(changed)}: executed by no test")
        return 0
    nodeids = sorted({n for c in contexts if c and (n := _nodeid(c, files))})
    if nodeids:
        print("selected:", " ".join(nodeids), flush=True)
        if subprocess.run([*PYTEST, *nodeids], cwd=ROOT, check=False).returncode != 0:
            return 1
    print("whole files:", " ".join(files), flush=True)
    return subprocess.run([*PYTEST, *files], cwd=ROOT, check=False).returncode


def _skip_annotations(session: Path, path: str) -> int:
    from cosmic_ray.work_db import use_db  # installed by the nox session only
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = _annotation_spans((ROOT / path).read_text(encoding="utf-8"))
    skipped = 0
    with use_db(str(session)) as db:
        for item in db.work_items:
            if all(
                any(s <= tuple(m.start_pos) and tuple(m.end_pos) <= e for s, e in spans)
                for m in item.mutations
            ):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
                skipped += 1
    return skipped


def _run(module: dict[str, object], workdir: Path) -> tuple[int, int, list[tuple[str, str, int]]]:
    path = str(module["path"])
    map_file = _coverage_map(module, workdir)
    command = shlex.join([sys.executable, str(Path(__file__).resolve()), "--test", str(map_file)])
    config = workdir / "config.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{path}"\n'
        f"timeout = {TIMEOUT}.0\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n"
        "\n[cosmic-ray.distributor]\n"
        'name = "local"\n',
        encoding="utf-8",
    )
    session = workdir / "session.sqlite"
    session.unlink(missing_ok=True)
    cosmic = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run([*cosmic, "init", str(config), str(session)], check=True, cwd=ROOT)
    skipped = _skip_annotations(session, path)
    print(f"{path}: {skipped} mutants inside annotations not run", flush=True)
    subprocess.run([*cosmic, "exec", str(config), str(session)], check=True, cwd=ROOT)
    dump = subprocess.run(
        [*cosmic, "dump", str(session)], check=True, cwd=ROOT, capture_output=True, text=True
    )
    ran = killed = 0
    survivors: list[tuple[str, str, int]] = []
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("test_outcome") not in ("killed", "survived"):
            continue  # skipped, not run, or incompetent (the mutant does not even import)
        ran += 1
        if result["test_outcome"] == "killed":
            killed += 1
            continue
        for mutation in item["mutations"]:
            survivors.append(
                (mutation["operator_name"], mutation["module_path"], mutation["start_pos"][0])
            )
    return ran, killed, survivors


def main(argv: list[str]) -> int:
    if argv[:1] == ["--test"]:
        return _test_one(Path(argv[1]))
    modules = tomllib.loads(MODULES.read_text(encoding="utf-8"))["module"]
    if argv:
        modules = [m for m in modules if m["path"] in argv]
        if not modules:
            print(f"no module of {MODULES.name} is named {argv}", file=sys.stderr)
            return 2
    failed = False
    LAST_RUN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        for module in modules:
            accepted = {(a["operator"], a["line"]): a["reason"] for a in module["accepted"]}
            ran, killed, survivors = _run(module, Path(tmp))
            score = 100.0 * killed / ran if ran else 100.0
            report = [f"{module['path']}: {killed}/{ran} killed ({score:.1f}%)"]
            seen = set()
            for operator, path, line in survivors:
                key = _key(ROOT / path, operator, line)
                seen.add(key)
                if key in accepted:
                    report.append(f"  accepted {operator} at {path}:{line}: {accepted[key]}")
                else:
                    failed = True
                    report.append(f"  SURVIVED {operator} at {path}:{line}: {key[1]}")
            for key in accepted.keys() - seen:
                report.append(f"  no longer survives (remove from the list): {key[0]}: {key[1]}")
            print("\n".join(report), flush=True)
            name = str(module["path"]).replace("/", ".").removesuffix(".py")
            (LAST_RUN / f"{name}.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
