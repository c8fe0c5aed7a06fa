#!/bin/sh
# First start of the PostgreSQL volume only (/docker-entrypoint-initdb.d): one role and database
# for the job store, one role for Temporal, which creates its own two databases (CREATEDB).
# Passwords travel as psql variables, so no quoting in them can break the SQL.
# Changing a password later: ALTER ROLE ... PASSWORD ..., since this script does not run again.
set -eu

psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v jobs_user="${JOBS_DB_USER:-render}" \
    -v jobs_db="${JOBS_DB_NAME:-jobs}" \
    -v jobs_password="$JOBS_DB_PASSWORD" \
    -v temporal_user="${TEMPORAL_DB_USER:-temporal}" \
    -v temporal_password="$TEMPORAL_DB_PASSWORD" <<'SQL'
CREATE ROLE :"jobs_user" LOGIN PASSWORD :'jobs_password';
CREATE DATABASE :"jobs_db" OWNER :"jobs_user";
CREATE ROLE :"temporal_user" LOGIN CREATEDB PASSWORD :'temporal_password';
SQL
