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
  pass, the rest of the module's test files runs before the mutant is called a survivor. A line
  executed only outside any test (import time, fixtures, a subprocess) runs the whole files.

So a killed mutant was killed by a failing test, and a survivor passed every test file of
its module.

Two things make one mutant's pytest runs cheap without changing what they run:

- a fork-server (``--serve``) imports pytest, its plugins and the third-party libraries the
  module's tests import, once; each pytest run is a child forked from it that imports this
  project (``integrations``, the tests, conftest) fresh from disk, with the caller's
  environment, working directory, stdout and stderr;
- the migrated template database the tests clone is made once, by the measured run with the
  unmutated code, and kept (``INTEGRATIONS_TEST_TEMPLATE``, ``INTEGRATIONS_TEST_KEY``: see
  tests/conftest.py). A mutant of a line that runs while the template is made (a session
  fixture's setup) or outside any test (import time) makes its own, as a plain run would.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
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
#: pytest's exit status when no test is left to run (every one was selected and passed).
NO_TESTS_LEFT = 5
#: The environment that makes the tests clone a template made once (tests/conftest.py).
SHARED_TEMPLATE = ("INTEGRATIONS_TEST_TEMPLATE", "INTEGRATIONS_TEST_KEY")
#: Top-level names the fork-server never imports: this project's own code.
OWN = {"integrations", "tests", "conftest", "mutants", "mutants_contexts", "__main__"}


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


def _function_bodies(source: str) -> set[int]:
    """The lines inside a function's body. Any other line (a decorator, a class or def
    header, a module or class level statement) runs when the module is imported, which
    coverage puts down to whichever test imported it first: only the whole files can
    tell whether such a mutant is seen."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            end = node.body[-1].end_lineno or node.body[-1].lineno
            lines.update(range(node.body[0].lineno, end + 1))
    return lines


def _nodeid(context: str, test_files: list[str]) -> str | None:
    """The test a coverage context names, if it is one of these files'."""
    return context if context.split("::")[0] in test_files else None


def _coverage_map(module: dict[str, object], workdir: Path, shared: dict[str, str]) -> Path:
    """Run the module's tests once under coverage; write which tests execute which line.
    This run makes the shared template (``shared``) with the unmutated code."""
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
    env.update(shared)
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
                # Lines run outside any test (import time) or while a session fixture is set
                # up (the template database is made then): a mutant of one of them does not
                # use the template made by the unmutated code.
                "template_lines": sorted(
                    line
                    for line, contexts in by_line.items()
                    if any(not c or c.startswith("session:") for c in contexts)
                ),
                "shared": shared,
                "server": str(workdir / "server.sock"),
                "statements": {str(k): v for k, v in _statement_lines(source).items()},
            }
        ),
        encoding="utf-8",
    )
    return out


def _test_one(map_file: Path, quick: bool = False) -> int:
    """Cosmic-ray's test command: run what can kill the mutant now in the module's file.
    ``quick``: a mutant inside a function body that its selected tests do not kill is
    reported as surviving without running the rest of the files."""
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
    env = {k: v for k, v in os.environ.items() if k not in SHARED_TEMPLATE}
    if lines.isdisjoint(cmap["template_lines"]):
        env.update(cmap["shared"])
    else:
        print("the template database is made anew: the mutant runs while it is made")
    nodeids = sorted({n for c in contexts if c and (n := _nodeid(c, files))})
    if nodeids:
        print("selected:", " ".join(nodeids), flush=True)
        if _pytest([*PYTEST[3:], *nodeids], env, cmap["server"]) != 0:
            return 1
    if quick and nodeids and lines <= _function_bodies(cmap["source"]):
        print("quick: the rest of the files is not run", flush=True)
        return 0
    # The selected tests passed under this mutant already: not run twice.
    print("whole files:", " ".join(files), "less the tests above", flush=True)
    deselect = [arg for n in nodeids for arg in ("--deselect", n)]
    code = _pytest([*PYTEST[3:], *files, *deselect], env, cmap["server"])
    return 0 if code == NO_TESTS_LEFT and deselect else code


def _pytest(args: list[str], env: dict[str, str], server: str) -> int:
    """``python -m pytest *args`` in ``env``: a child of the fork-server, or a new process."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(server)
    except OSError:
        return subprocess.run(
            [sys.executable, "-m", "pytest", *args], env=env, check=False
        ).returncode
    with conn:
        body = json.dumps({"args": args, "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(body))], [1, 2])
        conn.sendall(body)
        answer = b""
        while chunk := conn.recv(16):
            answer += chunk
    # No answer: the child died without one (killed, or crashed): a failed run.
    return int(answer) if answer else 1


def _third_party(files: list[str]) -> list[str]:
    """The modules, in import order, that collecting ``files`` imports from outside this
    project: found in a separate process, so that the server imports none of the project."""
    probe = (
        "import json, os, sys, pytest\n"
        "root, prefix = sys.argv[1], os.path.realpath(sys.prefix)\n"
        "sys.argv[:2] = ['pytest']\n"
        "pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', '-n', '0',\n"
        "             *sys.argv[1:]])\n"
        "names = []\n"
        "for name, mod in list(sys.modules.items()):\n"
        "    file = getattr(mod, '__file__', None)\n"
        f"    if not file or name.split('.')[0] in {sorted(OWN)!r}:\n"
        "        continue\n"
        "    real = os.path.realpath(file)\n"
        "    if real.startswith(root + os.sep) and not real.startswith(prefix + os.sep):\n"
        "        continue\n"
        "    names.append(name)\n"
        "print('\\n' + json.dumps(names))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT), *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return [str(n) for n in json.loads(done.stdout.strip().splitlines()[-1])]
    except (ValueError, IndexError):
        return []


def _serve(server: str, files: list[str]) -> int:
    """The fork-server: import what the tests import from outside the project, then fork a
    child per request that runs pytest as ``python -m pytest`` would, in the caller's
    environment, working directory, stdout and stderr, and answers its exit status."""
    import importlib

    sys.path[0] = str(ROOT)  # as python -m pytest from ROOT has it
    for name in _third_party(files):
        with contextlib.suppress(Exception):  # what fails here, the child imports itself
            importlib.import_module(name)
    own = [n for n in sys.modules if n.split(".")[0] in OWN - {"__main__"}]
    if own or threading.active_count() != 1:
        print(f"fork-server not started (imported {own}, threads)", file=sys.stderr)
        return 1
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(server)
    listener.listen(8)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
    print("ready", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                code = _child(conn)
            except BaseException:  # the caller counts a failed run
                code = 3
            os._exit(code)
        conn.close()


def _child(conn: socket.socket) -> int:
    header, fds, _, _ = socket.recv_fds(conn, 4, 2)
    (size,) = struct.unpack("!I", header)
    body = b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    request = json.loads(body)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.setpgid(0, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.dont_write_bytecode = True  # as cosmic-ray's PYTHONDONTWRITEBYTECODE=1
    sys.path[0] = os.getcwd()

    def watch() -> None:
        # The caller gone (cosmic-ray's timeout kills it): end this run and its children.
        if not conn.recv(1):
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    import pytest

    # The libraries imported before pytest started are not rewritten for assertions (only
    # their own asserts' messages differ); pytest's warning about that is not a failure here.
    args = ["-W", "ignore::pytest.PytestAssertRewriteWarning", *request["args"]]
    sys.argv = ["pytest", *args]
    code = int(pytest.main(args))
    sys.stdout.flush()
    sys.stderr.flush()
    conn.sendall(str(code).encode())
    return code


def _listed(report: Path) -> set[tuple[str, str, int]]:
    """(operator, path, line) of each mutant a report (``mutants/last-run/``) lists as
    surviving or accepted."""
    found = set()
    for text in report.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s+(?:SURVIVED|accepted) (\S+) at (\S+):(\d+):", text)
        if match:
            found.add((match.group(1), match.group(2), int(match.group(3))))
    return found


def _skip(
    session: Path,
    path: str,
    again: set[tuple[str, str, int]] | None,
    part: tuple[int, int] = (1, 1),
) -> tuple[int, int]:
    """Mark as skipped the mutants inside annotations and, when ``again`` is given, those
    it does not list; how many of each. With ``part`` (K, N), only every Nth mutant from
    the Kth on, in source order, is left to run (the other parts run elsewhere)."""
    from cosmic_ray.work_db import use_db  # installed by the nox session only
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = _annotation_spans((ROOT / path).read_text(encoding="utf-8"))
    annotations = unlisted = 0
    with use_db(str(session)) as db:
        items = sorted(
            db.work_items,
            key=lambda i: [
                (str(m.module_path), *m.start_pos, *m.end_pos, m.operator_name, m.occurrence)
                for m in i.mutations
            ],
        )
        index, count = part
        for number, item in enumerate(items):
            if number % count != index - 1:
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
                continue
            if all(
                any(s <= tuple(m.start_pos) and tuple(m.end_pos) <= e for s, e in spans)
                for m in item.mutations
            ):
                annotations += 1
            elif again is not None and not all(
                (m.operator_name, str(m.module_path), m.start_pos[0]) in again
                for m in item.mutations
            ):
                unlisted += 1
            else:
                continue
            db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    return annotations, unlisted


Survivor = tuple[str, str, int]


def _run(
    module: dict[str, object],
    workdir: Path,
    again: set[tuple[str, str, int]] | None = None,
    part: tuple[int, int] = (1, 1),
    quick: bool = False,
) -> tuple[int, int, list[Survivor]]:
    path = str(module["path"])
    from integrations import generate_key  # unmutated: no mutant is applied yet

    shared = {
        "INTEGRATIONS_TEST_TEMPLATE": f"integrations_tpl_mutants_{os.getpid()}",
        "INTEGRATIONS_TEST_KEY": generate_key(),
    }
    server = None
    try:
        map_file = _coverage_map(module, workdir, shared)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(workdir / "server.sock"), *module["tests"]],  # type: ignore[misc]
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            print(f"{path}: no fork-server; each pytest run is a new process", flush=True)
        return _cosmic(path, workdir, map_file, again, part, quick)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        _drop_database(shared["INTEGRATIONS_TEST_TEMPLATE"])


def _drop_database(name: str) -> None:
    """Drop the shared template, and the emptied databases parked beside it."""
    snippet = (
        "import asyncio, sys, asyncpg\n"
        "from tests.conftest import _admin, _admin_dsn\n"
        "async def main(name):\n"
        "    conn = await asyncpg.connect(_admin_dsn())\n"
        "    try:\n"
        "        rows = await conn.fetch('SELECT datname FROM pg_database'\n"
        "                                ' WHERE starts_with(datname, $1)', name + '_p')\n"
        "    finally:\n"
        "        await conn.close()\n"
        "    for n in [name, *(r[0] for r in rows)]:\n"
        "        await _admin(_admin_dsn(), f'DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)')\n"
        "asyncio.run(main(sys.argv[1]))\n"
    )
    subprocess.run([sys.executable, "-c", snippet, name], cwd=ROOT, check=False)


def _cosmic(
    path: str,
    workdir: Path,
    map_file: Path,
    again: set[tuple[str, str, int]] | None,
    part: tuple[int, int],
    quick: bool = False,
) -> tuple[int, int, list[Survivor]]:
    test = [sys.executable, str(Path(__file__).resolve()), "--test", str(map_file)]
    command = shlex.join([*test, "--quick"] if quick else test)
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
    annotations, unlisted = _skip(session, path, again, part)
    print(f"{path}: {annotations} mutants inside annotations not run", flush=True)
    if again is not None:
        print(f"{path}: {unlisted} mutants not listed in the report not run", flush=True)
    subprocess.run([*cosmic, "exec", str(config), str(session)], check=True, cwd=ROOT)
    dump = subprocess.run(
        [*cosmic, "dump", str(session)], check=True, cwd=ROOT, capture_output=True, text=True
    )
    ran = killed = 0
    survivors: list[Survivor] = []
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
        return _test_one(Path(argv[1]), quick=argv[2:3] == ["--quick"])
    if argv[:1] == ["--serve"]:
        return _serve(argv[1], argv[2:])
    quick = False
    part = (1, 1)
    again = None
    while argv[:1] in (["--quick"], ["--part"], ["--again"]):
        if argv[0] == "--quick":
            # A first pass: the survivors of the tests that run each mutated line, found
            # fast; the rest of the files is not run.
            quick = True
            argv = argv[1:]
        elif argv[0] == "--part":
            # One of N parts of each module's mutants, for runs side by side (in separate
            # checkouts: a mutant is applied to the files on disk).
            match = re.fullmatch(r"([1-9][0-9]*)/([1-9][0-9]*)", argv[1] if argv[1:] else "")
            if match is None or int(match.group(1)) > int(match.group(2)):
                print("--part takes K/N, 1 <= K <= N", file=sys.stderr)
                return 2
            part = (int(match.group(1)), int(match.group(2)))
            argv = argv[2:]
        else:
            # Only the mutants an earlier report lists: its survivors, with the tests since.
            if not argv[1:]:
                print("--again takes a report of an earlier run", file=sys.stderr)
                return 2
            again = _listed(Path(argv[1]))
            argv = argv[2:]
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
            ran, killed, survivors = _run(module, Path(tmp), again, part, quick)
            score = 100.0 * killed / ran if ran else 100.0
            report = [f"{module['path']}: {killed}/{ran} killed ({score:.1f}%)"]
            if quick:
                report[0] += " (--quick: survivors of the selected tests only)"
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
                if again is not None and not any(_key(ROOT / p, o, n) == key for o, p, n in again):
                    continue  # not run again
                report.append(f"  no longer survives (remove from the list): {key[0]}: {key[1]}")
            print("\n".join(report), flush=True)
            name = str(module["path"]).replace("/", ".").removesuffix(".py")
            if part != (1, 1):
                name += f".part-{part[0]}-of-{part[1]}"
            (LAST_RUN / f"{name}.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
