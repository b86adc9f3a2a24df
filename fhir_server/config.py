"""Server settings, read from the environment (prefix ``MSO_``) and an optional ``.env`` file.

Nothing is built at import time: :func:`fhir_server.app.create_app` takes a :class:`Settings`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server. Each field maps to an ``MSO_<NAME>`` environment variable."""

    model_config = SettingsConfigDict(env_prefix="MSO_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///./data/mso.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    host: str = Field("127.0.0.1", description="Address `mso serve` binds to")
    port: int = Field(8080, description="Port `mso serve` listens on")
    workers: int = Field(1, description="Worker processes for `mso serve`")
    access_log: bool = Field(
        True,
        description="`mso serve` logs one line per request to stdout: client address, method, "
        "path (never the query string), status, duration",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or CIDR networks of reverse proxies whose "
        "X-Forwarded-For / X-Forwarded-Proto `mso serve` honours; from any other client they "
        "are ignored (empty: none)",
    )
    base_url: str | None = Field(
        None,
        description="Public base URL of the FHIR endpoint (for Location and Bundle links); "
        "derived from the request when unset",
    )
    data_dir: Path = Field(Path("./data"), description="Folder for the SQLite file and blobs")
    blob_dir: Path | None = Field(
        None, description="Content-addressed blob store folder (default: <data_dir>/blobs)"
    )
    blob_inline_max_bytes: int = Field(
        64 * 1024, description="Binary content up to this size is stored inline in the database"
    )
    max_resource_bytes: int = Field(
        16 * 1024 * 1024, description="Largest FHIR JSON request body accepted (413 above)"
    )
    max_binary_bytes: int = Field(
        512 * 1024 * 1024, description="Largest raw Binary upload accepted (413 above)"
    )
    default_page_size: int = Field(20, description="Search page size when _count is absent")
    max_page_size: int = Field(1000, description="Largest _count honoured")
    search_timeout_ms: int = Field(
        30000,
        ge=0,
        description="PostgreSQL: statement_timeout of a search's statements in milliseconds "
        "(503 MSO-SEARCH-025 when it passes; 0: none)",
    )
    search_max_criteria: int = Field(
        40, ge=1, description="Most criteria in one search (400 MSO-SEARCH-020 above)"
    )
    search_max_values: int = Field(
        100,
        ge=1,
        description="Most comma-separated OR values in one criterion (400 MSO-SEARCH-021)",
    )
    search_max_chain_depth: int = Field(
        3, ge=1, description="Most chained / _has links in one criterion (400 MSO-SEARCH-022)"
    )
    search_max_includes: int = Field(
        10, ge=0, description="Most _include / _revinclude parameters (400 MSO-SEARCH-023)"
    )
    search_max_included: int = Field(
        1000,
        ge=0,
        description="Most resources _include / _revinclude add to a page (400 MSO-SEARCH-024)",
    )
    inline_reads: bool = Field(
        True, description="Serve read/vread on the event loop instead of a worker thread"
    )
    db_pool_size: int = Field(16, description="Database connection pool size per process")
    seed_demo: bool = Field(False, description="Load demo data at start-up when the DB is empty")
    currency: str = Field(
        "EUR",
        pattern=r"^[A-Z]{3}$",
        description="ISO 4217 currency of invoices; ChargeItemDefinition prices are in it",
    )

    # -- authorization server (SMART App Launch, fhir_server.auth) -------------------------------
    auth_issuer: str | None = Field(
        None,
        description="Public URL of the authorization server (issuer); default: the FHIR base "
        "URL without its trailing /fhir",
    )
    access_token_ttl: int = Field(300, description="Access token lifetime in seconds")
    refresh_token_ttl: int = Field(
        14 * 86400, description="Lifetime of an offline_access refresh token in seconds"
    )
    online_refresh_token_ttl: int = Field(
        8 * 3600, description="Lifetime of an online_access refresh token in seconds"
    )
    auth_code_ttl: int = Field(60, description="Authorization code lifetime in seconds")
    launch_ttl: int = Field(600, description="EHR launch id lifetime in seconds")
    auth_flow_ttl: int = Field(
        900, description="Seconds a user has to finish login, patient choice and consent"
    )
    login_max_failures: int = Field(
        5, description="Failed logins per user name within the window before a lockout"
    )
    login_max_failures_per_source: int = Field(
        20, description="Failed logins per client IP address within the window before a lockout"
    )
    login_failure_window: int = Field(900, description="Window counting failed logins (s)")
    login_lockout: int = Field(900, description="How long a lockout lasts (s)")
    allow_remote_jwks: bool = Field(
        False,
        description="Fetch backend clients' JWKS from non-loopback https URLs (off: loopback only)",
    )

    # -- notifications and email (fhir_server.messaging) ----------------------------------------
    public_url: str | None = Field(
        None,
        description="Public URL of the web front end, for deep links in emails "
        "(default: the FHIR base URL without its trailing /fhir)",
    )
    presence_window: int = Field(
        300,
        description="A user who made an authenticated request within this many seconds is "
        "online and gets in-app notifications only, no email",
    )
    chat_email_quiet_seconds: float = Field(
        900.0,
        description="A chat message starts a new conversation burst when the previous message "
        "to the same side came this many seconds before or more; an offline recipient gets one "
        "email per burst",
    )
    chat_email_snippet_chars: int = Field(
        0,
        ge=0,
        description="Characters of a chat message's text quoted in its email (0: none, only "
        "who wrote on which case)",
    )
    subscription_worker: bool = Field(
        True,
        description="Run the Subscription delivery thread in this process (mso serve; mso "
        "worker always runs one)",
    )
    change_feed_retention_hours: float = Field(
        168.0,
        description="Hours the change feed keeps a change once Subscription dispatch has read "
        "it, and the notification queue a settled notification",
    )
    subscription_allowed_hosts: str = Field(
        "",
        description="Hosts (names or addresses, comma-separated) a rest-hook Subscription may "
        "reach over plain http or at all besides https endpoints; none by default",
    )
    subscription_poll_interval: float = Field(
        0.2, description="Seconds an idle Subscription worker waits before looking again"
    )
    subscription_round_gap: float = Field(
        0.02,
        ge=0,
        description="Seconds a woken Subscription worker lets pass since its last round before "
        "the next, so that a stream of writes is dispatched in batches rather than one by one",
    )
    subscription_ws_token_seconds: float = Field(
        600.0, gt=0, description="Seconds a websocket binding token ($get-ws-binding-token) lasts"
    )
    subscription_timeout: float = Field(
        10.0, description="Seconds a rest-hook endpoint has to answer a notification"
    )
    subscription_retry_base: float = Field(
        5.0,
        description="Seconds before the first retry of a failed notification (doubled each try)",
    )
    subscription_retry_max: float = Field(
        600.0, description="Seconds between retries of a failed notification at most"
    )
    subscription_retry_hours: float = Field(
        24.0, description="Hours a notification is retried from its first try before it is given up"
    )
    smtp_host: str | None = Field(
        None, description="SMTP server for notification emails (unset: emails stay queued)"
    )
    smtp_port: int = Field(587, description="SMTP server port")
    smtp_user: str | None = Field(None, description="SMTP login (unset: no AUTH)")
    smtp_password: SecretStr | None = Field(None, description="SMTP password")
    smtp_starttls: Literal["auto", "true", "false"] = Field(
        "auto",
        description="STARTTLS: auto (when the server offers it), true (required: fail without "
        "it), false (never)",
    )
    smtp_from: str = Field("MSO <no-reply@localhost>", description="From address of emails")
    smtp_timeout: float = Field(30.0, description="SMTP connect/command timeout in seconds")
    smtp_max_attempts: int = Field(
        8, description="Delivery attempts of one email before it is marked failed"
    )
    smtp_retry_base: float = Field(
        30.0, description="Seconds before the first retry; doubled after each failed attempt"
    )
    smtp_retry_max: float = Field(3600.0, description="Longest wait between two retries (s)")
    mail_worker: bool = Field(
        True, description="Run the email outbox worker thread in each server process"
    )
    mail_poll_interval: float = Field(
        5.0, description="Seconds between two looks at the email outbox"
    )
    mail_retention_days: float = Field(
        30.0, description="Sent emails are deleted from the outbox after this many days"
    )

    # -- bulk data export (fhir_server.bulk) ---------------------------------------------------
    bulk_dir: Path | None = Field(
        None, description="Folder of bulk export output files (default: <data_dir>/bulk)"
    )
    bulk_worker: bool = Field(
        True,
        description="Run one bulk export worker thread in each `mso serve` process (`mso worker` "
        "runs more, on any host that reaches the database)",
    )
    bulk_lease_seconds: float = Field(
        60.0,
        description="A running export job whose worker has not renewed its lease for this long "
        "is taken over by another worker, from its last checkpoint",
    )
    bulk_poll_interval: float = Field(
        1.0, description="Seconds an idle bulk export worker waits between looks at the queue"
    )
    bulk_file_max_bytes: int = Field(
        256 * 1024 * 1024, description="An NDJSON output file is split after this many bytes"
    )
    bulk_batch_size: int = Field(
        1000, description="Resources an export reads from the database per batch at most"
    )
    bulk_batch_max_bytes: int = Field(
        8 * 1024 * 1024,
        description="Bytes of stored JSON an export loads at once at most (a larger resource "
        "alone, read in slices of this size)",
    )
    bulk_retention_hours: float = Field(
        24.0, description="Hours an export's files stay downloadable after it completes"
    )
    bulk_max_jobs_per_client: int = Field(
        3, description="Queued or running exports a client may have (429 above)"
    )

    # -- DICOMweb bridge (fhir_server.dicomweb) -------------------------------------------------
    orthanc_url: str | None = Field(
        None,
        description="Orthanc's HTTP base URL (e.g. http://127.0.0.1:8042) behind the /dicomweb "
        "bridge; unset: the bridge answers 503 (imaging not configured)",
    )
    orthanc_dicomweb_path: str = Field(
        "/dicom-web", description="Root of Orthanc's DICOMweb plugin under orthanc_url"
    )
    orthanc_user: str | None = Field(None, description="Orthanc HTTP login (unset: none)")
    orthanc_password: SecretStr | None = Field(None, description="Orthanc HTTP password")

    # -- case workflow (fhir_server.workflow) ---------------------------------------------------
    sla_hours_routine: int = Field(72, description="Hours a routine case may take (SLA due)")
    sla_hours_urgent: int = Field(24, description="Hours an urgent case may take (SLA due)")
    sla_hours_asap: int = Field(8, description="Hours an asap case may take (SLA due)")
    sla_hours_stat: int = Field(4, description="Hours a stat case may take (SLA due)")

    @field_validator("smtp_starttls", mode="before")
    @classmethod
    def _starttls_choice(cls, value: object) -> object:
        """Accept booleans and their usual spellings (``1``, ``yes``, ``off`` …) besides auto."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("1", "yes", "on"):
                return "true"
            if text in ("0", "no", "off"):
                return "false"
            return text
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        """Each entry an IP address or network (``10.1.2.3/8`` becomes ``10.0.0.0/8``): a typo
        must not pass as a name that no client address ever matches."""
        entries = [item.strip() for item in value.split(",") if item.strip()]
        parse = ipaddress.ip_address
        return ",".join(
            str(ipaddress.ip_network(item, strict=False) if "/" in item else parse(item))
            for item in entries
        )

    @property
    def bulk_path(self) -> Path:
        """Folder of the bulk export output files."""
        return self.bulk_dir or (self.data_dir / "bulk")

    @property
    def blob_path(self) -> Path:
        """Folder of the content-addressed blob store."""
        return self.blob_dir or (self.data_dir / "blobs")
