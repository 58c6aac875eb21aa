#!/usr/bin/env bash
# Start the machine's PostgreSQL (Debian's cluster) and make a role and database for the tests.
# Prints the URL to use as GPUFLEET_TEST_DATABASE_URL. Idempotent. Needs root.
set -euo pipefail
# Only the URL goes to stdout: whatever the PostgreSQL tools print ("Removed stale pid file.") goes to
# stderr. The server must not inherit fd 3 (the caller's $(...) pipe) or the caller waits forever.
exec 3>&1 1>&2
command -v pg_lsclusters >/dev/null || { echo "postgres.sh: PostgreSQL is not installed" >&2; exit 1; }
read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
if [ -z "${version:-}" ]; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  pg_createcluster "$version" main >/dev/null 3>&-
  read -r version cluster port status _ < <(pg_lsclusters -h | head -n 1)
fi
[ "$status" = online ] || pg_ctlcluster "$version" "$cluster" start 3>&-
psql_() { su postgres -c "psql -p $port -qtAX $*"; }
for _ in $(seq 1 50); do psql_ "-c 'select 1'" >/dev/null 2>&1 && break; sleep 0.2; done
[ "$(psql_ "-c \"select 1 from pg_roles where rolname='gpufleet'\"")" = 1 ] ||
  psql_ "-c \"create role gpufleet login password 'gpufleet'\""
# tests of server replicas make (and drop) a database of their own
psql_ "-c 'alter role gpufleet createdb'" >/dev/null
[ "$(psql_ "-c \"select 1 from pg_database where datname='gpufleet_test'\"")" = 1 ] ||
  psql_ "-c 'create database gpufleet_test owner gpufleet'"
echo "postgresql://gpufleet:gpufleet@127.0.0.1:$port/gpufleet_test" >&3
