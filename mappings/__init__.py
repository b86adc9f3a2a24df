"""Mappings between external formats and FHIR, as data plus the pure code that applies them."""
