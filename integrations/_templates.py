"""URL and header templates: ``{field}`` placeholders over a connection's stored values."""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Mapping

__all__ = ["render", "template_fields"]

_FIELD_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@functools.lru_cache(maxsize=1024)
def template_fields(template: str) -> tuple[str, ...]:
    """Names of the ``{field}`` placeholders in a template; refuses anything but plain names."""
    names: list[str] = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not _FIELD_KEY_RE.match(name) or spec or conversion:
            raise ValueError(f"template placeholder {{{name}}} must be a plain field name")
        names.append(name)
    return tuple(names)


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill a template's placeholders; a missing value raises KeyError naming the field."""
    return template.format_map({name: values[name] for name in template_fields(template)})
