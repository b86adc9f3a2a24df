"""MSO FHIR server: a FHIR R4 (4.0.1) server for medical second-opinion cases."""

__version__ = "0.1.0"
