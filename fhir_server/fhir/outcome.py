"""OperationOutcome and the one exception type every layer raises.

http://hl7.org/fhir/R4/operationoutcome.html. Every error leaves the server as an
OperationOutcome with an HTTP status; its ``details.coding`` carries a stable ``MSO-<AREA>-NNN``
code that tests assert on instead of prose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR_CODE_SYSTEM = "https://mso.example.org/fhir/CodeSystem/error-code"


@dataclass(slots=True)
class Issue:
    """One OperationOutcome.issue."""

    severity: str
    code: str
    diagnostics: str
    expression: list[str] | None = None
    error_code: str | None = None

    def to_fhir(self) -> dict[str, Any]:
        """Render as an OperationOutcome.issue element."""
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.error_code:
            out["details"] = {
                "coding": [{"system": ERROR_CODE_SYSTEM, "code": self.error_code}],
                "text": self.diagnostics,
            }
        out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out


@dataclass
class FhirError(Exception):
    """An error that becomes an OperationOutcome with ``status``.

    ``issue_code`` is the FHIR IssueType (``invalid``, ``not-found``, ``conflict`` …), ``code`` the
    stable MSO error code. Extra issues (for example one per validation problem) go in ``issues``.
    """

    status: int
    issue_code: str
    message: str
    code: str | None = None
    expression: list[str] | None = None
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def all_issues(self) -> list[Issue]:
        """The issues of the outcome: the explicit list, or one built from the message."""
        if self.issues:
            return self.issues
        return [Issue("error", self.issue_code, self.message, self.expression, self.code)]

    def to_outcome(self) -> dict[str, Any]:
        """Render as an OperationOutcome resource."""
        return operation_outcome(self.all_issues())


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    """Build an OperationOutcome resource from issues."""
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


def information(
    message: str, *, code: str = "informational", error_code: str | None = None
) -> dict[str, Any]:
    """An OperationOutcome carrying a single information issue (used for successful outcomes)."""
    return operation_outcome([Issue("information", code, message, None, error_code)])


def not_found(resource_type: str, resource_id: str) -> FhirError:
    """The 404 for a resource that never existed."""
    return FhirError(
        404,
        "not-found",
        f"Resource {resource_type}/{resource_id} is not known",
        code="MSO-REST-404",
    )


def gone(resource_type: str, resource_id: str, version: int) -> FhirError:
    """The 410 for a deleted resource."""
    return FhirError(
        410,
        "deleted",
        f"Resource {resource_type}/{resource_id} was deleted (version {version})",
        code="MSO-REST-410",
        headers={"ETag": f'W/"{version}"'},
    )
