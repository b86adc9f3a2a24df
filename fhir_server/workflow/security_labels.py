"""Who may set the security labels the access policy acts on (FHIR R4 3.1.0.6 Security Labels,
``meta.security``).

The :data:`~fhir_server.codes.WITHHELD_FROM_PROVIDER` label keeps a resource from providers
(:mod:`fhir_server.auth.policy`): the original of an imaging study whose de-identified copy is
shared with the case's external specialist. Adding or removing it changes who sees patient
data, so only the platform's operators (administrators, organization-less system clients such
as the DICOM gateway, the server itself) may; a requester could otherwise hand the identified
original back to the specialist.
"""

from __future__ import annotations

from fhir_server.auth.policy import require_platform
from fhir_server.codes import is_withheld_from_provider
from fhir_server.hooks import HookEvent


def labelled(event: HookEvent) -> bool:
    """A write whose new or previous content carries the withheld-from-provider label."""
    return is_withheld_from_provider(event.resource) or is_withheld_from_provider(event.previous)


def guard_label(event: HookEvent) -> None:
    """403 ``MSO-SEC-403`` when a caller who is not an operator adds or removes the label."""
    if is_withheld_from_provider(event.resource) != is_withheld_from_provider(event.previous):
        require_platform(
            event.caller, "set or remove the withheld-from-provider label", "MSO-SEC-403"
        )
