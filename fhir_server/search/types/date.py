"""Date search parameters: http://hl7.org/fhir/R4/search.html#date.

Every date, dateTime, instant, Period and Timing is stored as an inclusive range
``[low, high]`` in epoch milliseconds given by its precision (``2020`` is the whole year; a
Period without end is open). The search value is a range too, and prefixes compare ranges as
the spec says: ``eq`` the search range contains the target, ``gt`` the target extends after
the search range, ``sa`` starts after it, ``ap`` overlaps it widened by 10% of its distance
from now. Times without a zone are taken as UTC.
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir_server.search.fhirpath import Node
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import (
    Cmp,
    IndexRows,
    Not,
    Pred,
    ValueContext,
    all_of,
    any_of,
    bad_value,
    first_seen,
    split_prefix,
    unsupported_modifier,
)

TABLE = "idx_date"
MODIFIERS = ("missing",)
MIN_MS = -(2**62)
MAX_MS = 2**62
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(dt: datetime) -> int:
    return int((dt - _EPOCH) / timedelta(milliseconds=1))


def date_range(text: str) -> tuple[int, int]:
    """The inclusive millisecond range a FHIR date/dateTime/instant denotes."""
    m = _DATE.match(text.strip())
    if m is None:
        raise ValueError("not a FHIR date")
    year = int(m["y"])
    tz = UTC
    if m["tz"] and m["tz"] != "Z":
        sign = 1 if m["tz"][0] == "+" else -1
        tz = UTC if m["tz"] == "+00:00" else _offset(sign, m["tz"][1:])
    if m["m"] is None:
        start = datetime(year, 1, 1, tzinfo=tz)
        end = datetime(year + 1, 1, 1, tzinfo=tz)
    elif m["d"] is None:
        month = int(m["m"])
        start = datetime(year, month, 1, tzinfo=tz)
        end = start + timedelta(days=calendar.monthrange(year, month)[1])
    elif m["H"] is None:
        start = datetime(year, int(m["m"]), int(m["d"]), tzinfo=tz)
        end = start + timedelta(days=1)
    else:
        start = datetime(year, int(m["m"]), int(m["d"]), int(m["H"]), int(m["M"]), tzinfo=tz)
        if m["S"] is None:
            end = start + timedelta(minutes=1)
        else:
            start = start.replace(second=int(m["S"]))
            if m["f"]:
                digits = m["f"][1:]
                start = start.replace(microsecond=int((digits + "000000")[:6]))
                end = start + timedelta(microseconds=max(1000, 10 ** (6 - min(len(digits), 6))))
            else:
                end = start + timedelta(seconds=1)
    return _ms(start), _ms(end) - 1


def _offset(sign: int, hhmm: str) -> Any:
    from datetime import timezone

    hours, minutes = int(hhmm[:2]), int(hhmm[3:5])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def ranges_of(value: Any, typ: str | None) -> list[tuple[int, int]]:
    """The ranges a node contributes (date, Period, Timing)."""
    try:
        if isinstance(value, str):
            return [date_range(value)]
        if not isinstance(value, dict):
            return []
        if typ == "Period" or (typ is None and ("start" in value or "end" in value)):
            low = date_range(value["start"])[0] if value.get("start") else MIN_MS
            high = date_range(value["end"])[1] if value.get("end") else MAX_MS
            return [(low, high)]
        if typ == "Timing" or (typ is None and ("event" in value or "repeat" in value)):
            out = [date_range(e) for e in value.get("event", ()) if isinstance(e, str)]
            bounds = (value.get("repeat") or {}).get("boundsPeriod")
            if bounds:
                out.extend(ranges_of(bounds, "Period"))
            return out
    except (ValueError, OverflowError):
        return []
    return []


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a date parameter."""
    rows: IndexRows = []
    seen: set[tuple[int, int]] = set()
    for node in nodes:
        for low, high in ranges_of(node.value, node.type):
            if first_seen(seen, (low, high)):
                row = {"hash_identity": identity, "grp": grp, "low": low, "high": high}
                rows.append((TABLE, row))
    return rows


def now_ms() -> int:
    """The current time in epoch milliseconds."""
    return int(time.time() * 1000)


def range_predicate(prefix: str, low: int, high: int, now: int) -> Pred:
    """Compare the target range ``[low_col, high_col]`` with the search range ``[low, high]``."""
    # "low <= high" is implied by the other two; it bounds the index range scan on low.
    eq = all_of(Cmp("low", ">=", low), Cmp("low", "<=", high), Cmp("high", "<=", high))
    if prefix == "eq":
        return eq
    if prefix == "ne":
        return Not(eq)
    if prefix == "gt":
        return Cmp("high", ">", high)
    if prefix == "lt":
        return Cmp("low", "<", low)
    if prefix == "ge":
        return any_of(Cmp("high", ">", high), eq)
    if prefix == "le":
        return any_of(Cmp("low", "<", low), eq)
    if prefix == "sa":
        return Cmp("low", ">", high)
    if prefix == "eb":
        return Cmp("high", "<", low)
    if prefix == "ap":
        gap = max(abs(now - low), abs(now - high)) // 10
        return all_of(Cmp("low", "<=", high + gap), Cmp("high", ">=", low - gap))
    raise ValueError(prefix)


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one date value such as ``ge2020-01-01``."""
    if modifier is not None:
        raise unsupported_modifier(param.code, modifier)
    prefix, text = split_prefix(value)
    try:
        low, high = date_range(text)
    except (ValueError, OverflowError):
        raise bad_value(
            param.code, value, "expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]]"
        ) from None
    return all_of(
        Cmp("hash_identity", "=", identity),
        range_predicate(prefix, low, high, vc.now_ms or now_ms()),
    )


SORT_COLUMN = "low"
