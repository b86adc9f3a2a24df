"""Settings of the DICOM gateway (``mso dicom-gateway`` / ``python -m dicom_gateway``).

Every option is a command-line flag (see :mod:`dicom_gateway.__main__`) and an ``MSO_DICOM_*``
environment variable; a flag wins over the environment. The gateway reaches the FHIR server only
through its public FHIR API with a SMART Backend Services token, so it can run on its own host.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Every knob of the gateway. Each field maps to an ``MSO_DICOM_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="MSO_DICOM_", env_file=".env", extra="ignore")

    # -- the DICOM SCP ----------------------------------------------------------------------
    aet: str = Field("MSO", description="AE title the gateway answers as")
    host: str = Field("127.0.0.1", description="Address the DICOM SCP binds to")
    port: int = Field(11112, description="DICOM port the SCP listens on")
    allowed_aes: str = Field(
        "",
        description="Comma-separated calling AE titles allowed to associate (empty: any)",
    )
    spool_dir: Path = Field(
        Path("./data/dicom-spool"),
        description="Folder where received instances wait (fsynced) until Orthanc has them",
    )
    max_pdu: int = Field(0, description="Largest PDU the SCP receives (0: unlimited)")
    # -- Orthanc ----------------------------------------------------------------------------
    orthanc_url: str = Field("http://127.0.0.1:8042", description="Orthanc REST API base URL")
    orthanc_user: str | None = Field(None, description="Orthanc HTTP user (unset: no auth)")
    orthanc_password: SecretStr | None = Field(None, description="Orthanc HTTP password")
    forwarders: int = Field(4, description="Threads forwarding spooled instances to Orthanc")
    retry_max: float = Field(
        30.0, description="Longest wait (s) between two tries of an Orthanc that is down"
    )
    # -- the FHIR server --------------------------------------------------------------------
    fhir_base_url: str | None = Field(
        None,
        description="FHIR base URL of the MSO server (unset: forward only, no ImagingStudy sync)",
    )
    client_id: str | None = Field(None, description="The gateway's backend-services client_id")
    private_key: Path | None = Field(
        None, description="JSON Web Key (private, RS384 or ES384) signing the client assertion"
    )
    scope: str = Field(
        "system/ImagingStudy.cruds system/Endpoint.cruds system/Patient.rs "
        "system/ServiceRequest.rus system/Task.rus system/DocumentReference.rs system/Binary.crs",
        description="Scopes the gateway asks for",
    )
    patient_id_system: str = Field(
        "urn:oid:1.2.3.4.5.6.7.8.9",
        description="Identifier system that DICOM PatientID (0010,0020) values belong to",
    )
    issuer_systems: str = Field(
        "",
        description="IssuerOfPatientID=system pairs, comma-separated, for PatientIDs that "
        "name their issuer (0010,0021)",
    )
    dicomweb_url: str | None = Field(
        None,
        description="Public DICOMweb base of the MSO bridge for ImagingStudy Endpoints "
        "(default: the FHIR base with /fhir replaced by /dicomweb)",
    )
    poll_interval: float = Field(
        1.0, description="Seconds between looks at Orthanc's change feed and the FHIR server"
    )
    # -- priors from a remote PACS ----------------------------------------------------------
    remote_pacs: str | None = Field(
        None, description="The hospital PACS to query for priors, as AET@host:port"
    )

    @property
    def allowed(self) -> frozenset[str]:
        """The calling AE titles allowed (empty: any)."""
        return frozenset(a.strip() for a in self.allowed_aes.split(",") if a.strip())
