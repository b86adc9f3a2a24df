"""One module per search parameter type, each owning extract -> rows and value -> predicate.

http://hl7.org/fhir/R4/search.html#ptypes.
"""

from __future__ import annotations

from types import ModuleType

from fhir_server.search.types import date, number, quantity, reference, string, token, uri

KINDS: dict[str, ModuleType] = {
    "string": string,
    "token": token,
    "date": date,
    "reference": reference,
    "quantity": quantity,
    "number": number,
    "uri": uri,
}


def table_for(param_type: str, modifier: str | None) -> str:
    """The index table a value of ``param_type`` with ``modifier`` is matched against."""
    module = KINDS[param_type]
    chooser = getattr(module, "table_for", None)
    return chooser(modifier) if chooser else module.TABLE
