"""The built-in providers, and the Markdown table of them that docs/providers.md holds."""

from __future__ import annotations

from collections.abc import Iterable

from ._providers import AuthHeader, Provider, SetupField, UserinfoMap, ValidationRequest

__all__ = ["BUILTIN_PROVIDERS", "providers_markdown"]


def _api_key(
    key: str,
    name: str,
    check_url: str,
    host: str,
    *,
    header: AuthHeader | None = None,
    invalid: tuple[int, ...] = (401,),
    docs_url: str,
    description: str,
) -> Provider:
    return Provider(
        key=key,
        name=name,
        auth_type="api_key",
        api_hosts=(host,),
        auth_header=header or AuthHeader(template="Bearer {api_key}"),
        validation=ValidationRequest(url=check_url, invalid_statuses=invalid),
        docs_url=docs_url,
        description=description,
    )


BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    Provider(
        key="google",
        name="Google",
        auth_type="oauth2",
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        token_url="https://oauth2.googleapis.com/token",
        userinfo_url="https://openidconnect.googleapis.com/v1/userinfo",
        revoke_url="https://oauth2.googleapis.com/revoke",
        scopes=("openid", "email", "profile"),
        # Without these Google issues no refresh token on a repeat consent.
        authorize_params={"access_type": "offline", "prompt": "consent"},
        api_hosts=("*.googleapis.com",),
        validation=ValidationRequest(url="https://openidconnect.googleapis.com/v1/userinfo"),
        docs_url="https://developers.google.com/identity/protocols/oauth2/web-server",
        description="Google APIs (Gmail, Drive, Calendar, ...) through OAuth 2.0.",
    ),
    Provider(
        key="microsoft",
        name="Microsoft",
        auth_type="oauth2",
        authorize_url="https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/authorize",
        token_url="https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token",
        userinfo_url="https://graph.microsoft.com/v1.0/me",
        scopes=("openid", "email", "profile", "offline_access", "User.Read"),
        setup_fields=(
            SetupField(key="client_id", label="Application (client) ID", required=True),
            SetupField(key="client_secret", label="Client secret", required=True, secret=True),
            SetupField(
                key="tenant_id",
                label="Directory (tenant) ID",
                default="common",
                pattern=r"[A-Za-z0-9][A-Za-z0-9.-]*",
                expected="a tenant uuid, a domain such as 'contoso.onmicrosoft.com', or 'common'",
                help="Blank means 'common' (any work, school or personal account).",
            ),
        ),
        api_hosts=("graph.microsoft.com",),
        validation=ValidationRequest(url="https://graph.microsoft.com/v1.0/me"),
        userinfo_map=UserinfoMap(
            email=("mail", "userPrincipalName", "email"),
            name=("displayName", "name"),
            picture=("picture",),
            account_id=("id", "sub", "oid"),
        ),
        docs_url="https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow",
        description="Microsoft Graph (Outlook, OneDrive, Teams, ...) through Entra ID OAuth 2.0.",
    ),
    Provider(
        key="slack",
        name="Slack",
        auth_type="oauth2",
        authorize_url="https://slack.com/oauth/v2/authorize",
        token_url="https://slack.com/api/oauth.v2.access",
        userinfo_url="https://slack.com/api/auth.test",
        revoke_url="https://slack.com/api/auth.revoke",
        scopes=("chat:write", "channels:read"),
        scope_separator=",",
        # Turning PKCE on makes a Slack app a public client for good; most apps have it off.
        pkce=False,
        api_hosts=("slack.com",),
        validation=ValidationRequest(url="https://slack.com/api/auth.test", json_ok_key="ok"),
        # OpenID Connect userinfo is flat; users.identity nests the user; auth.test names it.
        userinfo_map=UserinfoMap(
            email=("email", "user.email"),
            name=("name", "user.real_name", "user.name", "user"),
            picture=("picture", "user.image_512", "user.image_192", "user.image_72"),
            account_id=("sub", "https://slack.com/user_id", "user.id", "user_id"),
        ),
        docs_url="https://docs.slack.dev/authentication/installing-with-oauth",
        description="Slack workspaces through OAuth 2.0 (bot token).",
    ),
    Provider(
        key="github",
        name="GitHub",
        auth_type="oauth2",
        authorize_url="https://github.com/login/oauth/authorize",
        token_url="https://github.com/login/oauth/access_token",
        userinfo_url="https://api.github.com/user",
        scopes=("read:user", "user:email"),
        api_hosts=("api.github.com",),
        validation=ValidationRequest(
            url="https://api.github.com/user",
            headers={"Accept": "application/vnd.github+json"},
        ),
        userinfo_map=UserinfoMap(
            email=("email",), name=("name", "login"), picture=("avatar_url",), account_id=("id",)
        ),
        docs_url="https://docs.github.com/apps/oauth-apps/building-oauth-apps/authorizing-oauth-apps",
        description="GitHub's REST API through an OAuth app.",
    ),
    _api_key(
        "openrouter",
        "OpenRouter",
        "https://openrouter.ai/api/v1/key",
        "openrouter.ai",
        docs_url="https://openrouter.ai/docs/api/reference/authentication",
        description="One API for many LLMs.",
    ),
    _api_key(
        "openai",
        "OpenAI",
        "https://api.openai.com/v1/models",
        "api.openai.com",
        docs_url="https://platform.openai.com/docs/api-reference/authentication",
        description="OpenAI models.",
    ),
    _api_key(
        "mistral",
        "Mistral AI",
        "https://api.mistral.ai/v1/models",
        "api.mistral.ai",
        docs_url="https://docs.mistral.ai/api/",
        description="Mistral models.",
    ),
    _api_key(
        "deepseek",
        "DeepSeek",
        "https://api.deepseek.com/user/balance",
        "api.deepseek.com",
        docs_url="https://api-docs.deepseek.com/",
        description="DeepSeek models.",
    ),
    _api_key(
        "xai",
        "xAI",
        "https://api.x.ai/v1/api-key",
        "api.x.ai",
        # xAI answers a malformed or unknown key with 400.
        invalid=(400, 401),
        docs_url="https://docs.x.ai/docs/api-reference",
        description="Grok models.",
    ),
    _api_key(
        "elevenlabs",
        "ElevenLabs",
        "https://api.elevenlabs.io/v1/user",
        "api.elevenlabs.io",
        header=AuthHeader(name="xi-api-key", template="{api_key}"),
        docs_url="https://elevenlabs.io/docs/api-reference/authentication",
        description="Text to speech and voice.",
    ),
    _api_key(
        "stripe",
        "Stripe",
        "https://api.stripe.com/v1/balance",
        "api.stripe.com",
        docs_url="https://docs.stripe.com/api/authentication",
        description="Payments; a secret or restricted key.",
    ),
    _api_key(
        "sendgrid",
        "SendGrid",
        "https://api.sendgrid.com/v3/scopes",
        "api.sendgrid.com",
        docs_url="https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/authentication",
        description="Transactional email.",
    ),
    _api_key(
        "brevo",
        "Brevo",
        "https://api.brevo.com/v3/account",
        "api.brevo.com",
        header=AuthHeader(name="api-key", template="{api_key}"),
        docs_url="https://developers.brevo.com/docs/getting-started",
        description="Email and SMS campaigns (formerly Sendinblue).",
    ),
    Provider(
        key="twilio",
        name="Twilio",
        auth_type="key_secret",
        setup_fields=(
            SetupField(
                key="account_sid",
                label="Account SID",
                required=True,
                pattern=r"AC[0-9a-fA-F]{32}",
                expected="'AC' followed by 32 hexadecimal digits, as shown in the Twilio console",
            ),
            SetupField(key="auth_token", label="Auth token", required=True, secret=True),
        ),
        api_hosts=("api.twilio.com", "*.twilio.com"),
        auth_header=AuthHeader(kind="basic", username="account_sid", password="auth_token"),
        validation=ValidationRequest(
            url="https://api.twilio.com/2010-04-01/Accounts/{account_sid}.json"
        ),
        docs_url="https://www.twilio.com/docs/usage/requests-to-twilio",
        description="SMS, voice and messaging; HTTP Basic with the account SID and auth token.",
    ),
    Provider(
        key="aws",
        name="Amazon Web Services",
        auth_type="key_secret",
        setup_fields=(
            SetupField(key="access_key", label="Access key ID", required=True),
            SetupField(key="secret_key", label="Secret access key", required=True, secret=True),
            SetupField(
                key="session_token",
                label="Session token",
                secret=True,
                help="Only for temporary credentials.",
            ),
            SetupField(
                key="region",
                label="Region",
                default="us-east-1",
                pattern=r"[a-z]{2}(-[a-z]+)+-\d+",
                expected="an AWS region code such as 'us-east-1' or 'eu-west-3'",
            ),
        ),
        api_hosts=("*.amazonaws.com",),
        auth_header=AuthHeader(kind="sigv4"),
        validation=ValidationRequest(
            url="https://sts.{region}.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15",
            # STS answers unknown keys and bad signatures with 403.
            invalid_statuses=(401, 403),
        ),
        docs_url="https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html",
        description="AWS APIs signed with SigV4 (needs the `aws` extra).",
    ),
    Provider(
        key="telegram",
        name="Telegram",
        auth_type="bot_token",
        api_hosts=("api.telegram.org",),
        auth_header=AuthHeader(kind="path", template="/bot{bot_token}"),
        validation=ValidationRequest(
            url="https://api.telegram.org/getMe",
            # Telegram answers a malformed token with 404.
            invalid_statuses=(401, 404),
            json_ok_key="ok",
        ),
        docs_url="https://core.telegram.org/bots/api#making-requests",
        description="Telegram Bot API; the token travels in the URL path.",
    ),
    Provider(
        key="discord",
        name="Discord",
        auth_type="bot_token",
        api_hosts=("discord.com",),
        auth_header=AuthHeader(template="Bot {bot_token}"),
        validation=ValidationRequest(url="https://discord.com/api/v10/users/@me"),
        docs_url="https://discord.com/developers/docs/reference#authentication",
        description="Discord bots.",
    ),
    Provider(
        key="smtp",
        name="SMTP",
        auth_type="credentials",
        setup_fields=(
            SetupField(key="host", label="Host", required=True),
            SetupField(key="port", label="Port", type="integer", default=587),
            SetupField(key="username", label="Username"),
            SetupField(key="password", label="Password", secret=True),
            SetupField(
                key="security",
                label="Security",
                type="choice",
                choices=("starttls", "tls", "none"),
                default="starttls",
                help="starttls (usually port 587), tls (usually 465) or none.",
            ),
        ),
        validation=ValidationRequest(hook="smtp"),
        docs_url="https://www.rfc-editor.org/rfc/rfc4954",
        description="Outgoing mail; checked by logging in to the server.",
    ),
    Provider(
        key="postgres",
        name="PostgreSQL",
        auth_type="credentials",
        setup_fields=(
            SetupField(key="host", label="Host", required=True),
            SetupField(key="port", label="Port", type="integer", default=5432),
            SetupField(key="username", label="Username", required=True),
            SetupField(key="password", label="Password", secret=True),
            SetupField(key="database", label="Database", required=True),
        ),
        validation=ValidationRequest(hook="postgres"),
        docs_url="https://www.postgresql.org/docs/current/libpq-connect.html",
        description="A PostgreSQL database; checked by connecting.",
    ),
)


def _describe_auth(provider: Provider) -> str:
    header = provider.auth_header
    if header is None:
        return "—"
    from ._schemes import header_kind

    kind = header_kind(header.kind)
    return kind.describe(header) if kind is not None else f"`{header.kind}`"


def _describe_check(provider: Provider) -> str:
    check = provider.validation
    if check is None:
        return "—"
    if check.hook == "smtp":
        return "SMTP login"
    if check.hook == "postgres":
        return "connect"
    return f"`{check.method} {check.url}`"


def _describe_fields(provider: Provider) -> str:
    parts = []
    for field in provider.setup_fields:
        text = f"`{field.key}`"
        if field.required:
            text += "*"
        if field.secret:
            text += " (secret)"
        if field.default is not None:
            text += f" = {field.default}"
        parts.append(text)
    return ", ".join(parts) or "—"


def providers_markdown(providers: Iterable[Provider] = BUILTIN_PROVIDERS) -> str:
    """docs/providers.md: one table row per provider, sorted by key."""
    lines = [
        "# Built-in providers",
        "",
        "<!-- Generated from integrations/_catalogue.py by scripts/gen_providers_doc.py;"
        " do not edit by hand. -->",
        "",
        "`*` marks a required setup field; `= x` is the value used when the field is blank.",
        "",
        "| Key | Name | Auth type | Setup fields | Auth | API hosts | Check |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(providers, key=lambda p: p.key):
        hosts = ", ".join(f"`{host}`" for host in p.api_hosts) or "—"
        cells = [
            f"`{p.key}`",
            f"[{p.name}]({p.docs_url})" if p.docs_url else p.name,
            p.auth_type,
            _describe_fields(p),
            _describe_auth(p),
            hosts,
            _describe_check(p),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
