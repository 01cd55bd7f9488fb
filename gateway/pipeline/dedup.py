"""Keys that decide dedup (SPEC §7 "Dedup").

- ``content_hash``: what the partner said, canonically serialised — same partner + source id +
  same hash is a resend (``duplicate``), a different hash is a correction (``corrected``).
- ``natural_key``: who did what and when — id number, CE year, activity identity (type,
  provider, plan, normalised title) and completion date.  Another source with the same key is
  a ``duplicate`` when it is worth the same hours and a ``conflict`` (held for ops) when it is
  not (``gateway.pipeline.items._claim``: the hours, not the unit and quantity claimed).
  Keyed like ``person_key``: a record's row keeps its year, type and completion date after
  its payload is pruned, so a plain digest would give the number back to a reader who tries
  the candidates against a catalogue of course titles.
- ``person_key``: who the record is about, an HMAC of the identity number's digest under
  ``PERSON_KEY_SECRET`` (:class:`gateway.person_keys.PersonKeys`), so neither the indexes nor
  a pruned stub give the number back to whoever reads the store without the secret.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from contracts import CESubmission
from gateway.person_keys import PersonKeys

_SPACES = re.compile(r"\s+")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def normalise_title(title: str) -> str:
    # Full-width letters and digits fold to ASCII (NFKC), case and whitespace do not matter.
    return _SPACES.sub("", unicodedata.normalize("NFKC", title)).casefold()


def content_hash(submission: CESubmission) -> str:
    # Field order is the model's and ``claimed.details`` is sorted on validation, so the JSON
    # of equal submissions is byte-equal whatever key order the partner used.
    return hash_json(submission.model_dump_json())


def hash_json(submission_json: str) -> str:
    """``content_hash`` from the submission's JSON, when the caller serialised it already."""
    return hashlib.sha256(submission_json.encode()).hexdigest()


def person_key(submission: CESubmission, keys: PersonKeys) -> str:
    person = submission.person
    return keys.of(person.id_type.value, person.id_number)


def natural_key(submission: CESubmission, keys: PersonKeys) -> str:
    activity = submission.activity
    return keys.rekey(_digest(
        "natural",
        submission.person.id_type.value,
        submission.person.id_number.upper(),
        str(submission.year),
        submission.activity_type.value,
        activity.provider_code or "",
        activity.plan_id or "",
        normalise_title(activity.title),
        activity.completed_on.isoformat(),
    ))
