"""Credentials of external service integrations in PostgreSQL, with authenticated calls."""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from . import oauth, webhooks
    from ._audit import AuditPage, AuditRecord, Breach, acting_as
    from ._cache import CacheStats
    from ._checkall import CheckItem, CheckReport
    from ._doctor import Diagnosis, Finding
    from ._errors import (
        AlreadyExists,
        AuditFailed,
        AuthorizationDenied,
        AuthorizationTimeout,
        ConfigurationError,
        CryptoError,
        DecryptionFailed,
        Deleted,
        EmptyName,
        EncryptionNotConfigured,
        HostNotAllowed,
        IntegrationsError,
        InvalidArgument,
        InvalidAttrs,
        InvalidField,
        InvalidInput,
        InvalidName,
        InvalidProviderKey,
        InvalidState,
        InvalidURL,
        InvalidUUID,
        LifecycleError,
        LockTimeout,
        MissingExtra,
        MissingField,
        NotConfigured,
        NotConnected,
        NotFound,
        OAuthError,
        ProviderConflict,
        ReauthRequired,
        RequestFailed,
        SchemaOutdated,
        StorageError,
        TokenRequestFailed,
        UnknownKey,
    )
    from ._events import ALL_OWNERS, AllOwners, HubStats, OwnerScope, Subscription
    from ._http import Response, bot_url
    from ._integrations import Integrations
    from ._models import (
        Connection,
        ConnectionList,
        DeviceAuthorization,
        Event,
        Page,
        RotationProgress,
        Validation,
    )
    from ._names import settings_key
    from ._owner import OwnerHandle
    from ._probes import register_check
    from ._providers import (
        AUTH_TYPES,
        AuthHeader,
        Provider,
        RejectedAnswer,
        SetupField,
        UserinfoMap,
        ValidationRequest,
    )
    from ._registry import ProviderRegistry, load_providers
    from ._schemes import (
        AuthContext,
        AuthKind,
        AuthScheme,
        HeaderScheme,
        Request,
        TokenGrant,
        TokenScheme,
        register_auth_kind,
        register_auth_scheme,
    )
    from ._sweep import SweepReport
    from ._vault import generate_key
    from ._webhooks import WebhookAttempt, WebhookDelivery, WebhookEndpoint
    from .webhooks import WebhookVerificationFailed

__all__ = [
    "ALL_OWNERS",
    "AUTH_TYPES",
    "AllOwners",
    "AlreadyExists",
    "AuditFailed",
    "AuditPage",
    "AuditRecord",
    "AuthContext",
    "AuthHeader",
    "AuthKind",
    "AuthScheme",
    "AuthorizationDenied",
    "AuthorizationTimeout",
    "Breach",
    "CacheStats",
    "CheckItem",
    "CheckReport",
    "ConfigurationError",
    "Connection",
    "ConnectionList",
    "CryptoError",
    "DecryptionFailed",
    "Deleted",
    "DeviceAuthorization",
    "Diagnosis",
    "EmptyName",
    "EncryptionNotConfigured",
    "Event",
    "Finding",
    "HeaderScheme",
    "HostNotAllowed",
    "HubStats",
    "Integrations",
    "IntegrationsError",
    "InvalidArgument",
    "InvalidAttrs",
    "InvalidField",
    "InvalidInput",
    "InvalidName",
    "InvalidProviderKey",
    "InvalidState",
    "InvalidURL",
    "InvalidUUID",
    "LifecycleError",
    "LockTimeout",
    "MissingExtra",
    "MissingField",
    "NotConfigured",
    "NotConnected",
    "NotFound",
    "OAuthError",
    "OwnerHandle",
    "OwnerScope",
    "Page",
    "Provider",
    "ProviderConflict",
    "ProviderRegistry",
    "ReauthRequired",
    "RejectedAnswer",
    "Request",
    "RequestFailed",
    "Response",
    "RotationProgress",
    "SchemaOutdated",
    "SetupField",
    "StorageError",
    "Subscription",
    "SweepReport",
    "TokenGrant",
    "TokenRequestFailed",
    "TokenScheme",
    "UnknownKey",
    "UserinfoMap",
    "Validation",
    "ValidationRequest",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookVerificationFailed",
    "acting_as",
    "bot_url",
    "generate_key",
    "load_providers",
    "oauth",
    "register_auth_kind",
    "register_auth_scheme",
    "register_check",
    "settings_key",
    "webhooks",
]

# Each public name is imported from its module on first use, so that `import integrations`
# (and the command line's --help) does not pay for the HTTP client, the drivers and the
# models before they are needed. The names are still exactly __all__.
_HOME = {
    "ALL_OWNERS": "._events",
    "AUTH_TYPES": "._providers",
    "AllOwners": "._events",
    "AlreadyExists": "._errors",
    "AuditFailed": "._errors",
    "AuditPage": "._audit",
    "AuditRecord": "._audit",
    "Breach": "._audit",
    "acting_as": "._audit",
    "AuthContext": "._schemes",
    "AuthHeader": "._providers",
    "AuthKind": "._schemes",
    "AuthScheme": "._schemes",
    "AuthorizationDenied": "._errors",
    "AuthorizationTimeout": "._errors",
    "CacheStats": "._cache",
    "CheckItem": "._checkall",
    "CheckReport": "._checkall",
    "ConfigurationError": "._errors",
    "Connection": "._models",
    "ConnectionList": "._models",
    "CryptoError": "._errors",
    "DecryptionFailed": "._errors",
    "Deleted": "._errors",
    "DeviceAuthorization": "._models",
    "Diagnosis": "._doctor",
    "EmptyName": "._errors",
    "EncryptionNotConfigured": "._errors",
    "Event": "._models",
    "Finding": "._doctor",
    "HeaderScheme": "._schemes",
    "HostNotAllowed": "._errors",
    "HubStats": "._events",
    "Integrations": "._integrations",
    "IntegrationsError": "._errors",
    "InvalidArgument": "._errors",
    "InvalidAttrs": "._errors",
    "InvalidField": "._errors",
    "InvalidInput": "._errors",
    "InvalidName": "._errors",
    "InvalidProviderKey": "._errors",
    "InvalidState": "._errors",
    "InvalidURL": "._errors",
    "InvalidUUID": "._errors",
    "LifecycleError": "._errors",
    "LockTimeout": "._errors",
    "MissingExtra": "._errors",
    "MissingField": "._errors",
    "NotConfigured": "._errors",
    "NotConnected": "._errors",
    "NotFound": "._errors",
    "OAuthError": "._errors",
    "OwnerHandle": "._owner",
    "OwnerScope": "._events",
    "Page": "._models",
    "Provider": "._providers",
    "ProviderConflict": "._errors",
    "ProviderRegistry": "._registry",
    "ReauthRequired": "._errors",
    "RejectedAnswer": "._providers",
    "Request": "._schemes",
    "RequestFailed": "._errors",
    "Response": "._http",
    "RotationProgress": "._models",
    "SchemaOutdated": "._errors",
    "SetupField": "._providers",
    "StorageError": "._errors",
    "Subscription": "._events",
    "SweepReport": "._sweep",
    "TokenGrant": "._schemes",
    "TokenRequestFailed": "._errors",
    "TokenScheme": "._schemes",
    "UnknownKey": "._errors",
    "UserinfoMap": "._providers",
    "Validation": "._models",
    "ValidationRequest": "._providers",
    "WebhookAttempt": "._webhooks",
    "WebhookDelivery": "._webhooks",
    "WebhookEndpoint": "._webhooks",
    "WebhookVerificationFailed": ".webhooks",
    "bot_url": "._http",
    "generate_key": "._vault",
    "load_providers": "._registry",
    "oauth": "",
    "register_auth_kind": "._schemes",
    "register_auth_scheme": "._schemes",
    "register_check": "._probes",
    "settings_key": "._names",
    "webhooks": "",
}


def __getattr__(name: str) -> _typing.Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'integrations' has no attribute {name!r}")
    value = _importlib.import_module(home or f".{name}", __name__)
    if home:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# The __future__ import binds a module attribute; public names are exactly __all__.
del annotations
