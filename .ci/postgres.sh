#!/usr/bin/env bash
# Best effort: a PostgreSQL server on 127.0.0.1 for tests/test_sweep.py (two sweep processes
# sharing one optuna study). From Debian's packages; idempotent (installs, creates and starts only
# what is missing). On success the last line of stdout is the SQLAlchemy URL of a test database;
# progress goes to stderr. Exits non-zero on any failure: .ci/run then warns and goes on, and the
# test skips saying why.
set -euo pipefail

PG_USER=pdmer
PG_PASSWORD=pdmer
PG_DB=pdmer_test

say() { echo "postgres.sh: $*" >&2; }

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else say "not root and no sudo"; exit 1; fi
fi

if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    say "installing postgresql (apt-get)"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -qx "$VERSION main"; then
    say "creating cluster $VERSION/main"
    "${SUDO[@]}" pg_createcluster "$VERSION" main >&2
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    say "starting cluster $VERSION/main on port $PORT"
    "${SUDO[@]}" pg_ctlcluster "$VERSION" main start >&2
fi

if command -v runuser >/dev/null; then
    as_postgres() { "${SUDO[@]}" runuser -u postgres -- "$@"; }
else
    as_postgres() { "${SUDO[@]}" su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; }
fi
as_postgres psql -p "$PORT" -v ON_ERROR_STOP=1 -qAt -c \
    "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
       CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD'; END IF; END \$\$;" >&2
if [ "$(as_postgres psql -p "$PORT" -qAt -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    as_postgres createdb -p "$PORT" -O "$PG_USER" "$PG_DB" >&2
fi

# the check the test makes: a password login over TCP on loopback
PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$PORT" -U "$PG_USER" -d "$PG_DB" -qAt -c "SELECT 1" >/dev/null
say "ready: database $PG_DB on 127.0.0.1:$PORT"
echo "postgresql+psycopg2://$PG_USER:$PG_PASSWORD@127.0.0.1:$PORT/$PG_DB"
