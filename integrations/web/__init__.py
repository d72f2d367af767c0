"""The admin console: a mountable ASGI app over Integrations, and a standalone server."""

from __future__ import annotations

from .._errors import MissingExtra

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtra(
        "the admin console needs the 'web' extra (from a checkout: pip install -e '.[web]')"
    ) from exc

from ._app import console
from ._serve import serve
from ._viewer import Admin, Owner, Viewer

__all__ = ["Admin", "Owner", "Viewer", "console", "serve"]
