"""Subject and body of a notification email: a short summary and a deep link, nothing clinical.

The deep link opens the case in the web viewer, ``{public_url}/viewer/cases/{case id}``; the
case id is the ServiceRequest's server-assigned id, which says nothing about the patient. The
viewer asks the user to sign in, so the link grants nothing by itself.
"""

from __future__ import annotations

from urllib.parse import quote

from fhir_server.config import Settings

SUBJECT_PREFIX = "[MSO] "
SIGNATURE = "MSO second-opinion platform (automatic message, please do not reply)"
PRIVACY_NOTE = (
    "For your privacy this email contains no medical details. Sign in to MSO to see the case."
)


def public_base(settings: Settings) -> str | None:
    """Where users open the web front end: ``public_url``, else the FHIR base without /fhir."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    if settings.base_url:
        base = settings.base_url.rstrip("/")
        return base[: -len("/fhir")] if base.endswith("/fhir") else base
    return None


def case_link(settings: Settings, case_id: str) -> str | None:
    """The viewer URL of a case, or ``None`` when no public URL is known."""
    base = public_base(settings)
    return f"{base}/viewer/cases/{quote(case_id, safe='')}" if base else None


def compose(settings: Settings, *, subject: str, text: str, case_id: str) -> tuple[str, str]:
    """The email subject and plain-text body for one notice about case ``case_id``."""
    link = case_link(settings, case_id)
    lines = [text, ""]
    lines += [f"Open the case: {link}", ""] if link else ["Sign in to MSO to open the case.", ""]
    lines += [PRIVACY_NOTE, "", "-- ", SIGNATURE, ""]
    return SUBJECT_PREFIX + subject, "\n".join(lines)
