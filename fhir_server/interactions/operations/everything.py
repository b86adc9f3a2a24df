"""Patient/$everything (http://hl7.org/fhir/R4/patient-operation-everything.html): the patient
and every resource in its compartment, through the repository's search (:meth:`Tx.search`), so
the caller's access filter applies to every type."""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.operations import Operation, register
from fhir_server.interactions.search import entry, search_unit
from fhir_server.storage.searching import compartment_params


def everything(ctx: InteractionContext, req: FhirRequest, patient_id: str | None) -> FhirResponse:
    """Patient/[id]/$everything: the patient and every resource in its compartment.

    One Bundle (type searchset) holding at most ``max_page_size`` compartment resources besides
    the patient; ``_type`` restricts the types, ``_since`` (instant) filters on lastUpdated.
    """
    registry = ctx.repo.registry
    if not patient_id:
        raise FhirError(400, "invalid", "$everything needs a patient id", code="MSO-SEARCH-008")
    wanted = {t.strip() for k, v in req.params if k == "_type" for t in v.split(",") if t.strip()}
    since = req.param("_since")
    criteria = [("_lastUpdated", f"ge{since}")] if since else []
    limit = ctx.settings.max_page_size
    entries: list[dict[str, Any]] = []
    with search_unit(ctx) as tx:
        patient = tx.read("Patient", patient_id)
        entries.append(entry(ctx, patient, "match"))
        for rtype in sorted(compartment_params()):
            if rtype == "Patient" or (wanted and rtype not in wanted):
                continue
            if rtype not in registry.resource_types:
                continue
            # the Patient read above was the permission check: a type the caller may not
            # search adds nothing (the access filter applies to every page)
            page = tx.search(
                rtype, criteria, count=limit - len(entries) + 1, strict=True,
                compartment=("Patient", patient_id), base_url=ctx.base_url, check=False,
            )  # fmt: skip
            for stored in page.matches:
                entries.append(entry(ctx, stored, "match"))
            if len(entries) > limit:
                break
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{ctx.base_url}/Patient/{patient_id}/$everything"}],
        "entry": entries[: limit + 1],
    }
    return FhirResponse(resource=bundle)


def _everything(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    return everything(ctx, req, req.resource_id)


register(
    Operation(
        name="everything",
        levels=frozenset({"instance", "type"}),
        handler=_everything,
        definition="http://hl7.org/fhir/OperationDefinition/Patient-everything",
        resource_types=frozenset({"Patient"}),
        documentation="The patient's compartment: everything the server holds about the patient",
    )
)
