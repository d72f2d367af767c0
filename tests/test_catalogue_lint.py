"""The built-in catalogue's rules, entry by entry: valid, traced to a docs page, https only,
the check under an allowed host once per-tenant hosts are rendered, host fields strict,
no duplicate keys, names or near-identical keys, scopes one per item."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aioresponses import aioresponses

from integrations._catalogue import CATALOGUE_DIR, builtin, builtin_keys, builtin_providers
from integrations._errors import InvalidField
from integrations._http import HttpClient, auth_for, host_allowed
from integrations._probes import check_credentials
from integrations._provider_file import lint_provider, parse_entries
from integrations._providers import Provider, ValidationRequest

KEYS = sorted(builtin_keys())
HOSTILE = ["evil.com#", "a.evil.com/", "x@evil.com", "evil.com/x", "a b", "a..b", "%65vil"]
# The list of the most common services that the catalogue covers, and those it
# leaves out (the closing note says why).
ENOUGH = 150
# The 100 most common services (most common first) and the built-in that covers
# each; None where the catalogue leaves the service out.
COMMON: dict[str, str | None] = {
    "GitHub": "github",
    "Jira": "jira",
    "Salesforce": "salesforce",
    "Slack": "slack",
    "Asana": "asana",
    "Discord": "discord",
    "Facebook": "facebook",
    "HubSpot": "hubspot",
    "Shopify": "shopify",
    "Stripe": "stripe",
    "Auth0": "auth0",
    "Bitbucket": "bitbucket",
    "Box": "box",
    "Dropbox": "dropbox",
    "Eventbrite": "eventbrite",
    "Google": "google",
    "LinkedIn": "linkedin",
    "Mailchimp": "mailchimp",
    "Reddit": "reddit",
    "Telegram": "telegram",
    "Trello": "trello",
    "X (Twitter)": "x",
    "Yandex": "yandex",
    "Zoom": "zoom",
    "Anthropic": "anthropic",
    "Notion": "notion",
    "Zendesk": "zendesk",
    "Login with Amazon": "amazon",
    "Battle.net": "battlenet",
    "Datadog": "datadog",
    "Figma": "figma",
    "GitLab": "gitlab",
    "Gumroad": "gumroad",
    "Microsoft (Entra/Graph)": "microsoft",
    "Miro": "miro",
    "Okta": "okta",
    "PagerDuty": "pagerduty",
    "PayPal": "paypal",
    "SendGrid": "sendgrid",
    "Snowflake": "snowflake",
    "Spotify": "spotify",
    "Strava": "strava",
    "SurveyMonkey": "surveymonkey",
    "Twitch": "twitch",
    "Zoho": "zoho",
    "Airtable": "airtable",
    "Confluence": "confluence",
    "Gmail": "gmail",
    "Gong": "gong",
    "Google Calendar": "google-calendar",
    "Google Drive": "google-drive",
    "Intercom": "intercom",
    "Linear": "linear",
    "Microsoft Teams": "microsoft-teams",
    "OpenAI": "openai",
    "Outlook": "outlook",
    "QuickBooks": "quickbooks",
    "ServiceNow": "servicenow",
    "Xero": "xero",
    "ActiveCampaign": "activecampaign",
    "Affinity": "affinity",
    "AWS": "aws",
    "BambooHR": "bamboohr",
    "Baserow": "baserow",
    "BigQuery": "bigquery",
    "Bitly": "bitly",
    "Brevo": "brevo",
    "Cal.com": "cal-com",
    "Calendly": "calendly",
    "ClickUp": "clickup",
    "Cloudflare": "cloudflare",
    "Coda": "coda",
    "Coinbase": "coinbase",
    "Contentful": "contentful",
    "Customer.io": "customer-io",
    "DigitalOcean": "digitalocean",
    "Discourse": None,
    "Disqus": None,
    "Exist": "exist",
    "Fitbit": "fitbit",
    "Foursquare": None,
    "Freshdesk": "freshdesk",
    "Google Ads": "google-ads",
    "Google Analytics": "google-analytics",
    "Google Docs": "google-docs",
    "Google Sheets": "google-sheets",
    "Google Tasks": "google-tasks",
    "Grafana": "grafana",
    "Harvest": "harvest",
    "HighLevel": "highlevel-private-integration",
    "Instagram": "instagram-access-token",
    "Keap": "keap",
    "LINE": "line",
    "monday.com": "monday",
    "OneDrive": "onedrive",
    "Perplexity": "perplexity",
    "Pinterest": "pinterest",
    "Pipedrive": "pipedrive",
    "PostHog": "posthog",
    "Segment": "segment",
}
COVERED_ENOUGH = 90
# Values for patterned fields whose ``expected`` text quotes no whole example.
OTHER_SAMPLES = ["AC" + "0123456789abcdef" * 2]


def provider(key: str) -> Provider:
    found = builtin(key)
    assert found is not None
    return found


def test_the_catalogue_is_big_enough_and_each_file_holds_its_key() -> None:
    assert len(KEYS) >= ENOUGH
    for key in KEYS:
        entries = parse_entries(CATALOGUE_DIR / f"{key}.toml")
        assert len(entries) == 1 and entries[0]["key"] == key


def test_the_common_services_are_covered() -> None:
    assert len(COMMON) == 100
    covered = {name: key for name, key in COMMON.items() if key is not None}
    assert len(covered) >= COVERED_ENOUGH
    for key in covered.values():
        assert key in KEYS


def test_no_two_entries_share_a_name_or_a_key_up_to_punctuation() -> None:
    providers = builtin_providers()
    names = [p.name.casefold() for p in providers]
    assert len(set(names)) == len(names)
    folded = [re.sub(r"[-_]", "", p.key) for p in providers]
    assert len(set(folded)) == len(folded)


@pytest.mark.parametrize("key", KEYS)
def test_entry_follows_the_rules(key: str) -> None:
    assert lint_provider(provider(key), builtin=True) == []


def sample_values(p: Provider) -> dict[str, Any]:
    """A valid value for each patterned field: the example its ``expected`` text quotes."""
    values: dict[str, Any] = {}
    for field in p.setup_fields:
        if field.pattern is None:
            continue
        quoted = re.findall(r"'([^']+)'", field.expected) + OTHER_SAMPLES
        fits = [q for q in quoted if re.fullmatch(field.pattern, q)]
        assert fits, f"{p.key}: field {field.key!r} names no example that fits its pattern"
        values[field.key] = fits[0]
    return values


TENANTED = [key for key in KEYS if provider(key).host_fields]


def test_per_tenant_providers_are_there() -> None:
    for key in ("salesforce", "shopify", "zendesk", "okta", "auth0", "servicenow", "jira"):
        assert key in TENANTED


@pytest.mark.parametrize("key", TENANTED)
def test_rendered_hosts_hold_the_check_and_hostile_values_pick_no_host(key: str) -> None:
    p = provider(key)
    values = sample_values(p)
    bound = p.for_data(values)
    assert len(bound.api_hosts) == len(p.api_hosts)
    assert all("{" not in host for host in bound.api_hosts)
    if p.validation is not None and p.validation.url:
        assert host_allowed(p.render_url(p.validation.url, values), bound.api_hosts)
    fields = {f.key: f for f in p.setup_fields}
    for name in p.host_fields:
        for hostile in HOSTILE:
            with pytest.raises(InvalidField):
                fields[name].coerce(hostile)
            rendered = p.for_data({**values, name: hostile}).api_hosts
            assert all("evil" not in host for host in rendered)
            assert len(rendered) < len(p.api_hosts) or name not in "".join(p.api_hosts)


@pytest.mark.parametrize(
    "key", [k for k in KEYS if provider(k).scheme.authorizes_user], ids=lambda k: k
)
def test_oauth_entries_have_their_endpoints_on_https(key: str) -> None:
    p = provider(key)
    assert p.authorize_url and p.token_url
    for url in (p.authorize_url, p.token_url):
        assert url.startswith("https://")


SECRET = "S3CR3T-catalogue-0123456789"


def working_credentials(p: Provider) -> dict[str, Any]:
    """Stored data that the provider's check accepts: every field filled, secrets with a
    marker, per-tenant fields with their example, an access token for token schemes."""
    values: dict[str, Any] = {}
    for field in p.setup_fields:
        if field.type != "string":
            continue
        values[field.key] = SECRET if field.secret else "value"
    values.update(sample_values(p) if any(f.pattern for f in p.setup_fields) else {})
    if p.scheme.uses_access_token:
        values["access_token"] = SECRET
    for name in p.runtime_fields:
        values.setdefault(name, SECRET)
    return values


def ok_payload(check: ValidationRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {"ok": True, "id": 1}
    if check.json_ok_key:
        node = payload
        parts = check.json_ok_key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = "yes"
    return payload


CHECKED = [k for k in KEYS if (c := provider(k).validation) is not None and c.hook is None]


@pytest.mark.parametrize("key", CHECKED)
async def test_each_check_is_sent_to_an_allowed_host_with_the_credentials(key: str) -> None:
    p = provider(key)
    check = p.validation
    assert check is not None
    creds = working_credentials(p)
    url = p.render_url(check.url, creds)
    headers, signed_url = auth_for(p, creds, url, method=check.method)
    client = HttpClient(backoff=0, timeout=5)
    try:
        with aioresponses() as mock:
            mock.add(signed_url, check.method, status=200, payload=ok_payload(check))
            result = await check_credentials(p, creds, http=client)
            ((_key, calls),) = mock.requests.items()
    finally:
        await client.close()
    assert result.ok, result.message
    sent = dict(calls[0].kwargs["headers"])
    # Headers that depend on the credentials alone are compared; signatures (a nonce, a
    # time) differ from one signing to the next.
    if p.scheme.prepared_headers(p, creds) is not None:
        for name, value in headers.items():
            assert sent[name] == value
    if check.body is not None:
        assert json.loads(calls[0].kwargs["data"]) == check.body
