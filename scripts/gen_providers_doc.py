"""Write docs/providers.md from the built-in catalogue; ``--check`` fails when the file is stale."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations._catalogue import providers_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "providers.md"


def main(argv: list[str]) -> int:
    text = providers_markdown()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is stale: run python scripts/gen_providers_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
