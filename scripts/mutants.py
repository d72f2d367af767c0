"""Mutation testing of the security and concurrency modules, run by ``nox -s mutants``.

For each module of ``mutants/modules.toml`` (or those named on the command line), cosmic-ray
mutates the file one mutant at a time and runs that module's test files against it. A
surviving mutant must be listed as accepted (an equivalent mutant, with its reason), or the
run fails. Prints each module's score (killed / mutants that ran).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "mutants" / "modules.toml"
#: Seconds one mutant's test run may take before it counts as killed (a hang is caught).
TIMEOUT = 900


def _key(path: Path, operator: str, line: int) -> tuple[str, str]:
    """A survivor by operator and the stripped source line: stable when lines move."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return operator, lines[line - 1].strip() if 0 < line <= len(lines) else ""


def _run(module: dict[str, object], workdir: Path) -> tuple[int, int, list[tuple[str, str, int]]]:
    path = str(module["path"])
    tests = " ".join(str(t) for t in module["tests"])  # type: ignore[attr-defined]
    config = workdir / "config.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{path}"\n'
        f"timeout = {TIMEOUT}.0\n"
        "excluded-modules = []\n"
        f'test-command = "{sys.executable} -m pytest -x -q -p no:cacheprovider -n 2 {tests}"\n'
        "\n[cosmic-ray.distributor]\n"
        'name = "local"\n',
        encoding="utf-8",
    )
    session = workdir / "session.sqlite"
    session.unlink(missing_ok=True)
    cosmic = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run([*cosmic, "init", str(config), str(session)], check=True, cwd=ROOT)
    subprocess.run([*cosmic, "exec", str(config), str(session)], check=True, cwd=ROOT)
    dump = subprocess.run(
        [*cosmic, "dump", str(session)], check=True, cwd=ROOT, capture_output=True, text=True
    )
    ran = killed = 0
    survivors: list[tuple[str, str, int]] = []
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("test_outcome") not in ("killed", "survived"):
            continue  # not run, or incompetent (the mutant does not even import)
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
    modules = tomllib.loads(MODULES.read_text(encoding="utf-8"))["module"]
    if argv:
        modules = [m for m in modules if m["path"] in argv]
        if not modules:
            print(f"no module of {MODULES.name} is named {argv}", file=sys.stderr)
            return 2
    failed = False
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        for module in modules:
            accepted = {(a["operator"], a["line"]): a["reason"] for a in module["accepted"]}
            ran, killed, survivors = _run(module, Path(tmp))
            score = 100.0 * killed / ran if ran else 100.0
            print(f"{module['path']}: {killed}/{ran} killed ({score:.1f}%)")
            seen = set()
            for operator, path, line in survivors:
                key = _key(ROOT / path, operator, line)
                seen.add(key)
                if key in accepted:
                    print(f"  accepted {operator} at {path}:{line}: {accepted[key]}")
                else:
                    failed = True
                    print(f"  SURVIVED {operator} at {path}:{line}: {key[1]}")
            for key in accepted.keys() - seen:
                print(f"  no longer survives (remove from the list): {key[0]}: {key[1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
