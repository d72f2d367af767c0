"""Exception tree: every library error carries a stable ``code``.

::

    IntegrationsError
     ├─ ConfigurationError              configuration
     │   ├─ EncryptionNotConfigured     encryption_not_configured
     │   ├─ SchemaOutdated              schema_outdated
     │   └─ MissingExtra                missing_extra
     ├─ LifecycleError                  lifecycle
     ├─ StorageError                    storage
     │   └─ LockTimeout                 lock_timeout
     ├─ InvalidInput (also ValueError)  invalid
     │   ├─ EmptyName                   empty_name
     │   ├─ InvalidName                 invalid_name
     │   ├─ InvalidUUID                 invalid_uuid
     │   ├─ InvalidProviderKey          invalid_provider_key
     │   ├─ InvalidAttrs                invalid_attrs
     │   │   ├─ MissingField            missing_field
     │   │   └─ InvalidField            invalid_field
     │   ├─ InvalidURL                  invalid_url
     │   └─ ProviderConflict            provider_conflict
     ├─ AlreadyExists                   already_exists
     ├─ NotFound                        not_found
     │   ├─ NotConfigured               not_configured
     │   └─ Deleted                     deleted
     ├─ CryptoError                     crypto
     │   ├─ UnknownKey                  unknown_key
     │   └─ DecryptionFailed            decryption_failed
     ├─ HostNotAllowed                  host_not_allowed
     ├─ RequestFailed                   request_failed
     └─ OAuthError                      oauth
         ├─ InvalidState                invalid_state
         ├─ AuthorizationDenied         authorization_denied
         ├─ NotConnected                not_connected
         ├─ ReauthRequired              reauth_required
         ├─ TokenRequestFailed          token_request_failed
         └─ AuthorizationTimeout        authorization_timeout (also TimeoutError)

The class docstring is the default message. Messages never contain secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar


class IntegrationsError(Exception):
    """The integrations library failed."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.context = context
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class ConfigurationError(IntegrationsError):
    """The library is not configured correctly."""

    code = "configuration"


class EncryptionNotConfigured(ConfigurationError):
    """No encryption key is configured, so secrets cannot be stored.

    Pass ``keys=`` (see ``integrations.generate_key()``), set INTEGRATIONS_KEYS,
    or pass ``encryption="off"`` explicitly to store secrets in plain text.
    """

    code = "encryption_not_configured"


class SchemaOutdated(ConfigurationError):
    """The database schema is behind this version; run ``await integ.migrate()``."""

    code = "schema_outdated"


class MissingExtra(ConfigurationError):
    """An optional dependency is not installed; install the extra this message names."""

    code = "missing_extra"


class LifecycleError(IntegrationsError):
    """The Integrations object is not open (open it, or it was already closed)."""

    code = "lifecycle"


class StorageError(IntegrationsError):
    """The database operation failed."""

    code = "storage"


class InvalidInput(IntegrationsError, ValueError):
    """The input is malformed."""

    code = "invalid"


class EmptyName(InvalidInput):
    """The connection name is empty."""

    code = "empty_name"


class InvalidName(InvalidInput):
    """The connection name must match ^[A-Za-z0-9][A-Za-z0-9_-]*$."""

    code = "invalid_name"


class InvalidUUID(InvalidInput):
    """The value is not a valid UUID."""

    code = "invalid_uuid"


class InvalidProviderKey(InvalidInput):
    """The provider key is unknown or malformed."""

    code = "invalid_provider_key"


class InvalidAttrs(InvalidInput):
    """The setup attributes are malformed."""

    code = "invalid_attrs"


class MissingField(InvalidAttrs):
    """A required setup field is missing."""

    code = "missing_field"


class InvalidField(InvalidAttrs):
    """A setup field has the wrong type or value."""

    code = "invalid_field"


class InvalidURL(InvalidInput):
    """The URL is not an absolute http(s) URL."""

    code = "invalid_url"


class ProviderConflict(InvalidInput):
    """A provider with this key is already registered (pass override=True to replace a built-in)."""

    code = "provider_conflict"


class AlreadyExists(IntegrationsError):
    """A connection with this name already exists for the provider."""

    code = "already_exists"


class NotFound(IntegrationsError):
    """No matching connection exists."""

    code = "not_found"


class NotConfigured(NotFound):
    """The connection does not exist or has no saved credentials."""

    code = "not_configured"


class Deleted(NotFound):
    """The connection referenced by this uuid no longer exists."""

    code = "deleted"


class CryptoError(IntegrationsError):
    """A secret could not be encrypted or decrypted."""

    code = "crypto"


class UnknownKey(CryptoError):
    """The secret was encrypted with a key that is not in the keyring."""

    code = "unknown_key"


class DecryptionFailed(CryptoError):
    """The secret could not be decrypted (wrong key, tampered data or moved ciphertext)."""

    code = "decryption_failed"


class HostNotAllowed(IntegrationsError):
    """The URL's host is not one of the provider's API hosts; credentials were not sent."""

    code = "host_not_allowed"


class RequestFailed(IntegrationsError):
    """The HTTP request could not be completed."""

    code = "request_failed"


class OAuthError(IntegrationsError):
    """The OAuth flow failed."""

    code = "oauth"


class InvalidState(OAuthError):
    """The OAuth state is unknown, already used or expired."""

    code = "invalid_state"


class AuthorizationDenied(OAuthError):
    """The provider refused the authorization."""

    code = "authorization_denied"


class NotConnected(OAuthError):
    """The connection has no access token; connect it first."""

    code = "not_connected"


class ReauthRequired(OAuthError):
    """The provider rejected the grant; the connection must be authorized again."""

    code = "reauth_required"


class TokenRequestFailed(OAuthError):
    """The token endpoint could not be reached or failed."""

    code = "token_request_failed"

    def __init__(
        self, message: str | None = None, *, transient: bool = False, **context: Any
    ) -> None:
        super().__init__(message, transient=transient, **context)
        # Retry policy hinges on this: 5xx, 429 and network failures are worth retrying.
        self.transient = transient


class LockTimeout(StorageError):
    """The connection's row lock, held by another transaction, was not granted within the
    lock timeout."""

    code = "lock_timeout"


class AuthorizationTimeout(OAuthError, TimeoutError):
    """The authorization was not completed in time."""

    code = "authorization_timeout"
