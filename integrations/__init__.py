"""Credentials of external service integrations in PostgreSQL, with authenticated calls."""

from __future__ import annotations

from . import oauth
from ._cache import CacheStats
from ._checkall import CheckItem, CheckReport
from ._doctor import Diagnosis, Finding
from ._errors import (
    AlreadyExists,
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
from ._http import AuthKind, Response, bot_url, register_auth_kind
from ._integrations import Integrations
from ._models import Connection, ConnectionList, Event, Page, RotationProgress, Validation
from ._names import settings_key
from ._owner import OwnerHandle
from ._probes import register_check
from ._providers import (
    AUTH_TYPES,
    AuthHeader,
    Provider,
    SetupField,
    UserinfoMap,
    ValidationRequest,
)
from ._registry import ProviderRegistry, load_providers
from ._sweep import SweepReport
from ._vault import generate_key

__all__ = [
    "ALL_OWNERS",
    "AUTH_TYPES",
    "AllOwners",
    "AlreadyExists",
    "AuthHeader",
    "AuthKind",
    "AuthorizationDenied",
    "AuthorizationTimeout",
    "CacheStats",
    "CheckItem",
    "CheckReport",
    "ConfigurationError",
    "Connection",
    "ConnectionList",
    "CryptoError",
    "DecryptionFailed",
    "Deleted",
    "Diagnosis",
    "EmptyName",
    "EncryptionNotConfigured",
    "Event",
    "Finding",
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
    "RequestFailed",
    "Response",
    "RotationProgress",
    "SchemaOutdated",
    "SetupField",
    "StorageError",
    "Subscription",
    "SweepReport",
    "TokenRequestFailed",
    "UnknownKey",
    "UserinfoMap",
    "Validation",
    "ValidationRequest",
    "bot_url",
    "generate_key",
    "load_providers",
    "oauth",
    "register_auth_kind",
    "register_check",
    "settings_key",
]

# The __future__ import binds a module attribute; public names are exactly __all__.
del annotations
