"""FHIR search: SearchParameter registry, index extraction, query parsing and SQL compilation."""
