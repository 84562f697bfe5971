#!/usr/bin/env bash
# Starts the PostgreSQL server Debian's `postgresql` package installed (its first cluster)
# and makes a role the tests may create databases with; prints the URL for
# SCANNER_TEST_DATABASE_URL. Run as root (CI, a dev container): sudo bash scripts/test-postgres.sh
set -euo pipefail
# Only the URL on stdout (the caller captures it); whatever the tools say goes to stderr.
exec 3>&1 1>&2
read -r version cluster port _ < <(pg_lsclusters -h | head -1)
pg_ctlcluster "$version" "$cluster" start 2>/dev/null 3>&- || pg_ctlcluster "$version" "$cluster" status >/dev/null
for _ in $(seq 1 60); do
  runuser -u postgres -- pg_isready -q -p "$port" && break
  sleep 1
done
runuser -u postgres -- psql -q -p "$port" -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'scanner_test') THEN
    CREATE ROLE scanner_test LOGIN CREATEDB PASSWORD 'scanner_test';
  END IF;
END $$;
SELECT 'CREATE DATABASE scanner_test OWNER scanner_test'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'scanner_test')\gexec
SQL
echo >&3 "postgresql://scanner_test:scanner_test@127.0.0.1:${port}/scanner_test"
