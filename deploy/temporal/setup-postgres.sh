#!/bin/sh
# Creates Temporal's two databases on PostgreSQL and brings their schemas to the version the
# admin-tools image carries (the one matching the server image: keep both tags equal).
# Runs on every `docker compose up`: an existing database is kept, setup-schema leaves a
# versioned schema alone, and update-schema only applies the missing versions.
# Connection: SQL_PLUGIN, SQL_HOST, SQL_PORT, SQL_USER, SQL_PASSWORD (read by temporal-sql-tool).
set -eu

schema_root=/etc/temporal/schema/postgresql/v12

setup() {
    db=$1
    dir=$2
    # create-database fails when the database exists; setup-schema below fails loudly if it
    # is missing for any other reason (no connection, no CREATEDB right).
    temporal-sql-tool --db "$db" create-database || echo "database $db exists; keeping it"
    temporal-sql-tool --db "$db" setup-schema -v 0.0
    temporal-sql-tool --db "$db" update-schema -d "$schema_root/$dir/versioned"
    echo "database $db is at the current schema"
}

setup "${TEMPORAL_DB:-temporal}" temporal
setup "${TEMPORAL_VISIBILITY_DB:-temporal_visibility}" visibility
