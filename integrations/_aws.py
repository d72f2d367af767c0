"""AWS Signature Version 4 through botocore's signer (the optional ``aws`` extra)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._errors import MissingExtra

__all__ = ["service_and_region", "sign"]

_REGIONAL = re.compile(r"^([a-z0-9-]+)\.([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com$")
_GLOBAL = re.compile(r"^([a-z0-9-]+)\.amazonaws\.com$")


def service_and_region(host: str, default_region: str) -> tuple[str, str]:
    """The signing service and region for an endpoint such as ``sts.eu-west-1.amazonaws.com``.

    A global endpoint (``iam.amazonaws.com``) signs for ``default_region``.
    """
    host = host.lower().rstrip(".")
    if match := _REGIONAL.match(host):
        return match.group(1), match.group(2)
    if match := _GLOBAL.match(host):
        return match.group(1), default_region
    raise ValueError("cannot tell the AWS service and region from this host")


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    credentials: Mapping[str, Any],
    *,
    service: str,
    region: str,
) -> dict[str, str]:
    """Headers (``Authorization``, ``X-Amz-Date``, ...) that sign this exact request."""
    try:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    except ImportError:
        raise MissingExtra(
            "AWS requests need botocore: install the aws extra "
            "(from a checkout: pip install -e '.[aws]')."
        ) from None
    creds = Credentials(
        str(credentials["access_key"]),
        str(credentials["secret_key"]),
        str(credentials["session_token"]) if credentials.get("session_token") else None,
    )
    request = AWSRequest(method=method, url=url, data=body or b"", headers=dict(headers))
    SigV4Auth(creds, service, region).add_auth(request)
    return {str(k): str(v) for k, v in request.headers.items()}
