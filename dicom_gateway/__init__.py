"""The MSO DICOM gateway: a DICOM SCP that spools durably, forwards to Orthanc and keeps the
FHIR ImagingStudy of every study in step, through the server's public FHIR API."""
