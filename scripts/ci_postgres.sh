#!/usr/bin/env bash
# Install (Debian's package), start and prepare a local PostgreSQL server for the store tests.
# Prints the SQLAlchemy URL of a scratch database on loopback; CI exports it as
# MOEBENCH_TEST_POSTGRES_URL so every PostgreSQL store test runs instead of skipping.
set -euo pipefail
if ! command -v pg_lsclusters > /dev/null || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq > /dev/null
    apt-get install -y -qq postgresql > /dev/null
fi
read -r version cluster _ < <(pg_lsclusters -h | head -1)
pg_ctlcluster "$version" "$cluster" start > /dev/null 2>&1 || true  # already running is fine
for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
su postgres -c "psql -q -tAc \"SELECT 1 FROM pg_roles WHERE rolname = 'moebench'\"" | grep -q 1 \
    || su postgres -c "psql -q -c \"CREATE ROLE moebench LOGIN SUPERUSER PASSWORD 'moebench'\""
su postgres -c "dropdb --if-exists moebench_test 2> /dev/null; createdb -O moebench moebench_test"
echo "postgresql+psycopg://moebench:moebench@127.0.0.1/moebench_test"
