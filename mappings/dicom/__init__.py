"""DICOM -> FHIR: the ImagingStudy mapping table and the functions applying it."""
