# The MSO FHIR server image: `mso serve`, `mso worker` and `mso dicom-gateway` (docker-compose.yml
# runs all three from it). Build: docker build -t mso-fhir-server .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MSO_DATA_DIR=/var/lib/mso \
    MSO_DICOM_SPOOL_DIR=/var/spool/mso-dicom

# An unprivileged user owns the data, spool and gateway key folders (named volumes copy that
# ownership).
RUN groupadd --system --gid 10001 mso \
    && useradd --system --uid 10001 --gid mso --home-dir /var/lib/mso --shell /usr/sbin/nologin mso \
    && mkdir -p /var/lib/mso /var/spool/mso-dicom /var/lib/mso-gateway \
    && chown mso:mso /var/lib/mso /var/spool/mso-dicom /var/lib/mso-gateway

WORKDIR /opt/mso
# What `pip install .` reads: the packages, the conformance resources it installs as data files.
COPY pyproject.toml README.md ./
COPY fhir_server ./fhir_server
COPY dicom_gateway ./dicom_gateway
COPY mappings ./mappings
COPY bench ./bench
COPY profiles ./profiles
COPY terminology ./terminology
RUN pip install . && rm -rf /opt/mso/build

USER mso
WORKDIR /var/lib/mso
EXPOSE 8080 11112
CMD ["sh", "-c", "mso migrate && exec mso serve --host 0.0.0.0 --port 8080"]
