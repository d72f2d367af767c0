"""Start-up: `import integrations`, `from integrations import Integrations` and
`integrations --help`, each in a fresh interpreter, against the bare interpreter's start.

Wall times are medians of runs taken in turn; the import times are what
`python -X importtime` reports for the package (cumulative, in the same runs).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import result

ROOT = Path(__file__).resolve().parent.parent
HELP = (
    "import sys\nfrom integrations.cli import main\nsys.argv = ['integrations', '--help']\n"
    "try:\n    main()\nexcept SystemExit:\n    pass\n"
)
CONTENDERS = {
    "bare interpreter": "pass",
    "import integrations": "import integrations",
    "from integrations import Integrations": "from integrations import Integrations",
    "integrations --help": HELP,
}
ROUNDS = 25


def run_once(code: str) -> tuple[float, float]:
    """Wall seconds of one interpreter running ``code``, and the seconds importtime gives
    all that it imported (top-level entries, cumulative: the interpreter's own start-up
    imports included)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    total = 0.0
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"; nested ones are indented.
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and parts[2][1:2] != " ":
            total += int(parts[1]) / 1e6
    return wall, total


def main() -> None:
    walls: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    imports: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for code in CONTENDERS.values():  # warm the file cache
        run_once(code)
    for _ in range(ROUNDS):
        for name, code in CONTENDERS.items():
            wall, package = run_once(code)
            walls[name].append(wall)
            imports[name].append(package)
    wall = {name: statistics.median(v) for name, v in walls.items()}
    imported = {name: statistics.median(v) for name, v in imports.items()}
    base = wall["bare interpreter"]
    print(f"start-up, medians of {ROUNDS} fresh interpreters each (python -X importtime)")
    for name in CONTENDERS:
        print(
            f"  {name:<40} wall {wall[name] * 1e3:7.1f} ms   imports "
            f"{imported[name] * 1e3:7.1f} ms   {wall[name] / base:5.2f}x the bare interpreter"
        )
    result(
        "startup",
        {
            "bare_ms": base * 1e3,
            "import_ms": wall["import integrations"] * 1e3,
            "bare_imports_ms": imported["bare interpreter"] * 1e3,
            "import_imports_ms": imported["import integrations"] * 1e3,
            "facade_ms": wall["from integrations import Integrations"] * 1e3,
            "facade_imports_ms": imported["from integrations import Integrations"] * 1e3,
            "help_ms": wall["integrations --help"] * 1e3,
            "help_imports_ms": imported["integrations --help"] * 1e3,
            "rounds": ROUNDS,
        },
    )


if __name__ == "__main__":
    main()
