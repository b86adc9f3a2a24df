"""Subscription topics (Subscriptions R5 Backport IG 1.1.0 on R4,
http://hl7.org/fhir/uv/subscriptions-backport/): the events a topic-based Subscription can ask for.

The topics are data, :file:`topics.json` beside this module: R5 ``SubscriptionTopic`` resources
(R4 has no such type, so they are not stored as resources; the CapabilityStatement names their
canonical URLs, as the IG asks of an R4 server). Each has one ``resourceTrigger``: the resource
type, the interactions that count (``create``, ``update``) and a FHIRPath criterion over
``%current`` (the version written) and ``%previous`` (the one before it, empty for a creation),
evaluated by fhirpathpy; ``canFilterBy`` lists the search parameters a subscriber is advised to
narrow it with (any search parameter of the type works, matched like R4 criteria).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fhirpathpy import compile as fp_compile
from fhirpathpy.models import models as fp_models

log = logging.getLogger(__name__)

_FILE = Path(__file__).with_name("topics.json")
_TYPE_PREFIX = "http://hl7.org/fhir/StructureDefinition/"


@dataclass(frozen=True, slots=True)
class Topic:
    """One subscription topic: its canonical URL, trigger and advertised filters."""

    url: str
    title: str
    res_type: str
    interactions: frozenset[str]
    criterion: str
    filters: tuple[str, ...]
    definition: dict[str, Any]

    def fires(
        self, method: str, current: dict[str, Any] | None, previous: dict[str, Any] | None
    ) -> bool:
        """Whether writing ``current`` (after ``previous``) by ``method`` is an event of this
        topic (a criterion that fails to evaluate is no event, and is logged)."""
        if method not in self.interactions or current is None:
            return False
        try:
            result = _compiled(self.criterion)({}, {"current": current, "previous": previous})
        except Exception:  # fhirpathpy raises plain exceptions on data it cannot evaluate
            log.warning("Subscription topic %s: criterion failed to evaluate", self.url)
            return False
        return result == [True]


@functools.cache
def _compiled(expression: str) -> Any:
    return fp_compile(expression, fp_models["r4"])


def _topic(definition: dict[str, Any]) -> Topic:
    (trigger,) = definition["resourceTrigger"]
    res_type = str(trigger["resource"]).removeprefix(_TYPE_PREFIX)
    return Topic(
        url=definition["url"],
        title=definition.get("title") or definition["url"],
        res_type=res_type,
        interactions=frozenset(trigger["supportedInteraction"]),
        criterion=trigger["fhirPathCriteria"],
        filters=tuple(f["filterParameter"] for f in definition.get("canFilterBy") or ()),
        definition=definition,
    )


@functools.cache
def topics() -> dict[str, Topic]:
    """The server's topics by canonical URL."""
    return {t.url: t for t in map(_topic, orjson.loads(_FILE.read_bytes()))}


def topic_of(url: str) -> Topic | None:
    """The topic with canonical ``url`` (a ``|version`` suffix is ignored), if this server has
    it."""
    return topics().get(url.partition("|")[0])
