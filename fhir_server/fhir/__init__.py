"""Pure FHIR helpers: JSON, definitions, OperationOutcome, validation, patching, Bundles."""
