#!/bin/sh
# Run once by the postgres image when its data volume is empty (/docker-entrypoint-initdb.d):
# Orthanc's index gets its own role and database beside the FHIR server's, so neither can touch
# the other's tables. The password comes from ORTHANC_DB_PASSWORD (docker-compose.yml).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v password="$ORTHANC_DB_PASSWORD" <<'SQL'
CREATE ROLE orthanc LOGIN PASSWORD :'password';
CREATE DATABASE orthanc OWNER orthanc;
SQL
