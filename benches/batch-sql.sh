#!/usr/bin/env bash
# tandem.batch() of 1,000 puts of 1 KiB: the set-based function (migration
# 0005) beside the per-operation loop it replaced (migration 0001), in the
# same run, on the same database.
#
#     BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres benches/batch-sql.sh
#
# It creates and drops the database tandem_batch_bench on that server, and
# uses target/debug/tandem (or $TANDEM_BIN) to migrate it.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${BENCH_DATABASE_URL:?set BENCH_DATABASE_URL to a PostgreSQL server URL}"
bin="${TANDEM_BIN:-target/debug/tandem}"
db=tandem_batch_bench
scratch="${url%/*}/$db"
psql -q "$url" -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap 'psql -q "$url" -c "DROP DATABASE IF EXISTS $db"' EXIT
DATABASE_URL="$scratch" "$bin" migrate >/dev/null 2>&1
old=$(awk '/^CREATE FUNCTION \{schema\}.batch/,/^END \$\$;/' src/db/migrations/0001_core.sql \
      | sed 's/{schema}.batch/pg_temp.batch_0001/; s/{schema}/tandem/g; s/{channel}/tandem/g')
{
    echo "$old"
    for run in 1 2 3 4 5; do
        for f in pg_temp.batch_0001 tandem.batch; do
            cat <<SQL
SELECT clock_timestamp() AS t0 \gset
SELECT $f(array_agg('put'::text), array_agg('bench'::text), array_agg('k' || g || '-$run-${f%%.*}'),
          array_agg(convert_to(repeat('x', 1024), 'UTF8')), array_agg('application/json'::text)) IS NOT NULL AS ok
  FROM generate_series(1, 1000) g \gset
SELECT '$f' AS fn, round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000, 1) AS ms \gset
\echo run $run :fn :ms ms
SQL
        done
    done
} | psql -q -X -v ON_ERROR_STOP=1 "$scratch"
