"""The DICOMweb bridge at ``[server]/dicomweb`` (DICOM PS3.18): QIDO-RS (10.6), WADO-RS (10.4)
and STOW-RS (10.5) proxied to Orthanc's DICOMweb plugin, with the FHIR API's tokens and access
rules per study, and every URL of its answers pointing at the bridge.

:mod:`.paths` parses a request path, :mod:`.access` decides which studies a caller may see
(through the access policy and the repository), :mod:`.proxy` talks to Orthanc (streaming),
:mod:`.qido` merges restricted searches, :mod:`.rewrite` rebases URLs in DICOM JSON,
:mod:`.metadata_cache` keeps series metadata, :mod:`.bridge` ties them together and
:mod:`.routes` is the HTTP shell.
"""
