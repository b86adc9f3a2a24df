"""Transport-free FHIR interactions: ``handler(ctx, request) -> FhirResponse``.

One module per interaction of http://hl7.org/fhir/R4/http.html. The REST layer turns HTTP into a
:class:`~fhir_server.interactions.base.FhirRequest` and a response back into HTTP; transaction
Bundles re-enter the same handlers for each entry.
"""
