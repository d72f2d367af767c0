"""Exception tree: every library error carries a stable ``code``.

::

    IntegrationsError
     ├─ ConfigurationError              configuration
     │   ├─ EncryptionNotConfigured     encryption_not_configured
     │   ├─ SchemaOutdated              schema_outdated
     │   └─ MissingExtra                missing_extra
     ├─ LifecycleError                  lifecycle
     ├─ StorageError                    storage
     │   ├─ LockTimeout                 lock_timeout
     │   └─ AuditFailed                 audit_failed
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
    """The integrations library failed; the exception's code and cause say more."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str | None = None, **context: Any) -> None:
        # The class docstring is the default message, as one plain line.
        self.message = message or " ".join((self.__doc__ or self.code).split())
        self.context = context
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class ConfigurationError(IntegrationsError):
    """The library is not configured correctly; check the arguments given to Integrations()."""

    code = "configuration"


class EncryptionNotConfigured(ConfigurationError):
    """No encryption key is configured, so secrets cannot be stored: pass keys= (a key from
    integrations.generate_key()) or set INTEGRATIONS_KEYS, or pass encryption="off" to store
    secrets in plain text."""

    code = "encryption_not_configured"


class SchemaOutdated(ConfigurationError):
    """The database schema is behind this version of the library; run await integ.migrate()."""

    code = "schema_outdated"


class MissingExtra(ConfigurationError):
    """An optional dependency is not installed; install the extra this message names."""

    code = "missing_extra"


class LifecycleError(IntegrationsError):
    """The Integrations object is not open (open it, or it was already closed)."""

    code = "lifecycle"


class StorageError(IntegrationsError):
    """The database operation failed; check that PostgreSQL is reachable with the configured DSN."""

    code = "storage"


class AuditFailed(StorageError):
    """The audit record could not be written, so the secret was not revealed; check the database."""

    code = "audit_failed"


class InvalidInput(IntegrationsError, ValueError):
    """The input is malformed; see the method's documentation for the accepted forms."""

    code = "invalid"


class InvalidArgument(InvalidInput, TypeError):
    """An argument has the wrong type or value; see the method's documentation."""

    # Malformed input, as InvalidInput: the same code, and also a TypeError.
    code = "invalid"


class EmptyName(InvalidInput):
    """The connection name is empty; give a name such as 'default'."""

    code = "empty_name"


class InvalidName(InvalidInput):
    """The connection name is not allowed: use letters, digits, '_' and '-', starting with a letter
    or digit, at most 100 characters."""

    code = "invalid_name"


class InvalidUUID(InvalidInput):
    """Expected a connection uuid; get one from a ref with await
    integ.resolve_to_uuid('provider:name')."""

    code = "invalid_uuid"


class InvalidProviderKey(InvalidInput):
    """The provider key is unknown or malformed; integ.list_providers() lists the registered
    ones."""

    code = "invalid_provider_key"


class InvalidAttrs(InvalidInput):
    """The setup attributes are malformed; pass a dict of the provider's setup fields."""

    code = "invalid_attrs"


class MissingField(InvalidAttrs):
    """A required setup field is missing; the provider's setup_fields list the required ones."""

    code = "missing_field"


class InvalidField(InvalidAttrs):
    """A setup field has the wrong type or value; the provider's setup_fields say what each
    accepts."""

    code = "invalid_field"


class InvalidURL(InvalidInput):
    """The URL is not an absolute http(s) URL; write it like https://api.example.com/path."""

    code = "invalid_url"


class ProviderConflict(InvalidInput):
    """A provider with this key is already registered (pass override=True to replace a built-in)."""

    code = "provider_conflict"


class AlreadyExists(IntegrationsError):
    """A connection with this name already exists for the provider; choose another name or use the
    existing one."""

    code = "already_exists"


class NotFound(IntegrationsError):
    """No matching connection exists; integ.list_connections(provider) lists the existing ones."""

    code = "not_found"


class NotConfigured(NotFound):
    """The connection does not exist or has no saved credentials; add it with add_connection() and
    save_setup()."""

    code = "not_configured"


class Deleted(NotFound):
    """The connection referenced by this uuid no longer exists; it was removed, so look it up again
    by 'provider:name'."""

    code = "deleted"


class CryptoError(IntegrationsError):
    """A secret could not be encrypted or decrypted; check the configured keys."""

    code = "crypto"


class UnknownKey(CryptoError):
    """The secret was encrypted with a key that is not in the keyring; add that key to keys= or
    INTEGRATIONS_KEYS."""

    code = "unknown_key"


class DecryptionFailed(CryptoError):
    """The secret could not be decrypted (wrong key, tampered data or moved ciphertext); save the
    secret again."""

    code = "decryption_failed"


class HostNotAllowed(IntegrationsError):
    """The URL's host is not one of the provider's API hosts, so credentials were not sent; use a
    URL on one of its api_hosts."""

    code = "host_not_allowed"


class RequestFailed(IntegrationsError):
    """The HTTP request could not be completed; check the network and the service's status, then
    retry."""

    code = "request_failed"


class OAuthError(IntegrationsError):
    """The OAuth flow failed; start the authorization again."""

    code = "oauth"


class InvalidState(OAuthError):
    """The OAuth state is unknown, already used or expired; start the authorization again with
    begin_authorization()."""

    code = "invalid_state"


class AuthorizationDenied(OAuthError):
    """The provider refused the authorization; the user can start it again."""

    code = "authorization_denied"


class NotConnected(OAuthError):
    """The connection has no access token; connect it first."""

    code = "not_connected"


class ReauthRequired(OAuthError):
    """The provider rejected the grant; the connection must be authorized again."""

    code = "reauth_required"


class TokenRequestFailed(OAuthError):
    """The token endpoint could not be reached or failed; retry later if the error is transient,
    else authorize again."""

    code = "token_request_failed"

    def __init__(
        self, message: str | None = None, *, transient: bool = False, **context: Any
    ) -> None:
        super().__init__(message, transient=transient, **context)
        # Retry policy hinges on this: 5xx, 429 and network failures are worth retrying.
        self.transient = transient


class LockTimeout(StorageError):
    """The connection's row lock, held by another transaction, was not granted within the lock
    timeout; retry, or raise lock_timeout."""

    code = "lock_timeout"


class AuthorizationTimeout(OAuthError, TimeoutError):
    """The authorization was not completed in time; start it again."""

    code = "authorization_timeout"
