"""The admin console: a mountable ASGI app over Integrations, and a standalone server."""

from __future__ import annotations

from ._app import console
from ._serve import serve
from ._viewer import Admin, Owner, Viewer

__all__ = ["Admin", "Owner", "Viewer", "console", "serve"]
