"""Online key rotation: every stored secret re-encrypted under the primary key, in batches."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from . import _telemetry as telemetry
from ._errors import CryptoError, EncryptionNotConfigured, InvalidArgument
from ._models import RotationProgress
from ._names import shown
from ._record import StoredRow
from ._repository import RESEAL_START, Repository, ResealBatch
from ._settings import MAXIMUM
from ._vault import CREDENTIALS, SECRET_FIELDS, Vault

__all__ = ["PKCE_FIELD", "ProgressCallback", "RotationProgress", "rotate"]

log = logging.getLogger("integrations")

# The field name a pending authorization's PKCE verifier is sealed under (its row id is
# the state hash).
PKCE_FIELD = "pkce_verifier"

ProgressCallback: TypeAlias = Callable[[RotationProgress], object]

_FIRST_STATE_HASH = ""
#: Connections re-encrypted by one pass past which the table's statistics are refreshed.
ANALYZE_AFTER = 1000


def _skip(found: dict[str, None], exc: CryptoError, kind: str, ident: str) -> None:
    # The message names the key id and field, never a value: the operator has to find it.
    if ident not in found:
        found[ident] = None
        log.warning(
            "key rotation skipped %s %s: %s (%s)",
            kind,
            ident,
            exc.message,
            exc.code,
            extra=telemetry.fields(
                "key_rotation_skipped", uuid=ident if kind == "connection" else None
            ),
        )


async def rotate(
    repo: Repository,
    vault: Vault,
    *,
    secret_fields_of: Callable[[StoredRow], Iterable[str]],
    all_secret_fields: Iterable[str],
    batch_size: int = 500,
    progress: ProgressCallback | None = None,
) -> RotationProgress:
    """Move every connection and pending PKCE verifier to the primary key; see
    ``Integrations.rotate_keys``."""
    with telemetry.span("integrations.rotate_keys") as span:
        state = await _rotate(
            repo,
            vault,
            secret_fields_of=secret_fields_of,
            all_secret_fields=all_secret_fields,
            batch_size=batch_size,
            progress=progress,
        )
        span.set_attribute("integrations.rotation.rows", state.rotated)
        span.set_attribute("integrations.rotation.scanned", state.scanned)
        span.set_attribute("integrations.rotation.batches", state.batches)
        return state


async def _rotate(
    repo: Repository,
    vault: Vault,
    *,
    secret_fields_of: Callable[[StoredRow], Iterable[str]],
    all_secret_fields: Iterable[str],
    batch_size: int,
    progress: ProgressCallback | None,
) -> RotationProgress:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAXIMUM["batch_size"]
    ):
        raise InvalidArgument(
            f"batch_size must be a positive integer, got {shown(batch_size)}", field="batch_size"
        )
    if progress is not None and not callable(progress):
        raise InvalidArgument(
            "progress must be a callable taking a RotationProgress", field="progress"
        )
    keyring = vault.keyring
    if keyring is None:
        raise EncryptionNotConfigured(
            "rotate_keys() needs encryption keys: pass keys= (the new primary first, then "
            "the old ones) or set INTEGRATIONS_KEYS"
        )
    primary = keyring.primary_id
    # Data keys first: once wrapped by the primary source, the old one may be retired.
    custody = keyring.custody
    rewrapped = 0 if custody is None else await custody.rewrap(repo)
    # Plaintext secrets (stored while encryption was off) are sealed too, but only while
    # encryption is on.
    plaintext_fields = (
        sorted({*SECRET_FIELDS, *all_secret_fields, CREDENTIALS}) if vault.enabled else []
    )
    started = time.monotonic()
    total = await repo.count_to_reseal(primary, plaintext_fields, vault.enabled)
    state = RotationProgress(primary_kid=primary, total=total, rewrapped=rewrapped)
    # Rows that cannot be decrypted (a key missing from the ring, an edited envelope) are
    # left as they are and reported; one of them must not hold up every other row.
    undecryptable: dict[str, None] = {}
    undecryptable_pending: dict[str, None] = {}

    def reseal_row(row: StoredRow) -> dict[str, Any] | None:
        fields = frozenset(secret_fields_of(row))
        if not vault.needs_rotation(row.data, fields):
            return None
        try:
            return vault.reseal(row.uuid, row.data, fields)
        except CryptoError as exc:
            _skip(undecryptable, exc, "connection", row.uuid)
            return None

    def reseal_verifier(state_hash: str, verifier: Any) -> Any | None:
        data = {PKCE_FIELD: verifier}
        if not vault.needs_rotation(data, (PKCE_FIELD,)):
            return None
        try:
            return vault.reseal(state_hash, data, (PKCE_FIELD,))[PKCE_FIELD]
        except CryptoError as exc:
            _skip(undecryptable_pending, exc, "pending authorization", state_hash)
            return None

    async def report(batch: ResealBatch | None) -> None:
        nonlocal state
        state = dataclasses.replace(
            state,
            undecryptable=tuple(undecryptable),
            undecryptable_pending=tuple(undecryptable_pending),
        )
        if batch is None:
            state = dataclasses.replace(state, elapsed=time.monotonic() - started, done=True)
        else:
            state = dataclasses.replace(
                state,
                rotated=state.rotated + batch.rewritten,
                scanned=state.scanned + batch.scanned,
                batches=state.batches + 1,
                elapsed=time.monotonic() - started,
            )
        log.debug(
            "key rotation to %s: %d rotated, %d scanned of %d",
            primary,
            state.rotated,
            state.scanned,
            state.total,
            extra=telemetry.fields("key_rotation_progress"),
        )
        if progress is not None:
            result = progress(state)
            if inspect.isawaitable(result):
                await result

    # Keyset pagination over indexes of the rows still to do: rows already under the
    # primary never match again, so a run that stopped half way resumes by starting over.
    # The cursor moves past the rows a batch skipped because another transaction held
    # them; those are retried below.
    cursor = RESEAL_START
    held_rows: dict[str, None] = {}
    while True:
        batch = await repo.reseal_connections(
            cursor, batch_size, primary, plaintext_fields, reseal_row
        )
        if batch.last is None:
            break
        cursor = batch.last
        # A later pass over what is left (see Repository.reseal_connections) may take a
        # row an earlier one skipped, or skip it again: each is retried once, if at all.
        for row_uuid in batch.examined:
            held_rows.pop(row_uuid, None)
        held_rows.update(dict.fromkeys(batch.skipped))
        await report(batch)
    skipped = list(held_rows)
    telemetry.annotate("integrations.rotation.skipped", len(skipped))
    while skipped:
        held: list[str] = []
        for start in range(0, len(skipped), batch_size):
            batch = await repo.reseal_listed(
                skipped[start : start + batch_size], reseal_row, wait=False
            )
            held.extend(batch.skipped)
            if batch.scanned:
                await report(batch)
        if len(held) == len(skipped):
            # Nothing moved: wait for each row in turn, holding no other row meanwhile.
            for row_uuid in held:
                batch = await repo.reseal_listed([row_uuid], reseal_row, wait=True)
                if batch.scanned:
                    await report(batch)
            break
        skipped = held
    if state.rotated >= ANALYZE_AFTER:
        # The statistics still say the rows are under the old key: refreshed now, the
        # next pass reads its (empty) index ranges rather than every row.
        await repo.analyze_connections()
    cursor = _FIRST_STATE_HASH
    while True:
        batch = await repo.reseal_pending(
            cursor, batch_size, primary, vault.enabled, reseal_verifier
        )
        if batch.last is None:
            break
        cursor = batch.last
        await report(batch)
    await report(None)
    log.info(
        "key rotation to %s done: %d rows re-encrypted, %d examined, %d skipped as "
        "undecryptable in %.1f s",
        primary,
        state.rotated,
        state.scanned,
        len(state.undecryptable) + len(state.undecryptable_pending),
        state.elapsed,
        extra=telemetry.fields("key_rotation_done"),
    )
    return state
