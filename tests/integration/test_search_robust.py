"""Search never answers 500: random parameter names, modifiers and values (search.html).

Lenient requests answer 200 (ignored parameters reported in an OperationOutcome entry),
strict ones 200 or 400; both databases (PostgreSQL rejects NUL characters in text, …).
"""

from __future__ import annotations

import random

NAMES = [
    "name", "name:exact", "name:contains", "name:missing", "name:text", "identifier",
    "identifier:of-type", "identifier:in", "identifier:above", "birthdate", "_id", "_id:not",
    "_lastUpdated", "_tag", "_tag:not", "_profile:below", "_profile:above", "_text", "_content",
    "_list", "_has", "_has:Observation:subject", "_has:Observation:subject:code",
    "general-practitioner:Practitioner.name", "general-practitioner:identifier",
    "organization.partof.name", "_sort", "_count", "_include", "_include:iterate",
    "_revinclude", "_total", "_summary", "_elements", "_cursor", "_type", "_filter", "x:y:z",
    "", "_has:::", "name.x", "code-value-quantity", "value-quantity", "subject", "date",
]  # fmt: skip
VALUES = [
    "", "a", "\\", "a\\,b", "x|y", "|", "||", "a|b|c|d", "ge", "gt2020", "eq2020-13-45",
    "ap1", "1e999", "NaN", "Patient/", "Patient/1/_history/x", "http://x", "*",
    "Patient:name", "-name", "abc,,def", "true", "maybe", "$", "a$b", "%", "_",
    "'; drop table resource;--", "\x00", "é" * 300, "99999999999999999999",
]  # fmt: skip


def test_random_searches_never_fail_with_500(client) -> None:
    rng = random.Random(11)
    failures = []
    for _ in range(120):
        params = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(1, 3))]
        rtype = rng.choice(["Patient", "Observation", ""])
        strict = rng.random() < 0.5
        headers = {"Prefer": "handling=strict"} if strict else {}
        resp = client.get(f"/fhir/{rtype}", params=params, headers=headers)
        if resp.status_code not in (200, 400):
            failures.append((rtype, params, strict, resp.status_code))
    assert not failures
