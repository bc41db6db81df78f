#!/bin/sh
# Postgres' own ceiling for single-row transactions on this machine, four ways: a plain insert,
# an insert with a minimal per-row NOTIFY trigger (the physical limit of any NOTIFY design), an
# insert into `appointments` through the relay's capture (event log, commit-order lock, one
# NOTIFY per event), and the same without the commit-order lock, to show what the lock costs (for
# comparison only: without it, event ids no longer follow commit order). No relay attached. Each
# insert books a random dentist of 1,000 for a random patient of 10,000, as relay-bench's writers
# spread over many users, so the writers do not queue on one profile's foreign-key lock.
#
#   bench/ceiling.sh [clients] [seconds] [rounds]     (needs `cargo build --release -p relay`)
#
# Rounds repeat the four measures in turn, so that a slow moment of the machine does not fall on one
# of them only.
set -eu
clients=${1:-8}
seconds=${2:-10}
rounds=${3:-1}
pg=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
relay=${RELAY_BIN:-$(dirname "$0")/../target/release/relay}
db=relay_ceiling_$$
work=$(mktemp -d)
trap 'psql -q "$pg/postgres" -c "drop database if exists $db with (force)" >/dev/null; rm -rf "$work"' EXIT

psql -q "$pg/postgres" -c "create database $db"
DATABASE_URL="$pg/$db" "$relay" migrate >/dev/null
psql -q "$pg/$db" -f "$(dirname "$0")/ceiling-tables.sql"

run() {
    table=$1
    label=$2
    cat > "$work/$table.sql" <<SQL
\\set d random(1, 1000)
\\set p random(1001, 11000)
insert into $table (id, patient_id, dentist_id, starts_at, ends_at)
values (gen_random_uuid(), ('00000000-0000-4000-8000-' || lpad(:p::text, 12, '0'))::uuid,
        ('00000000-0000-4000-8000-' || lpad(:d::text, 12, '0'))::uuid, now(), now() + interval '1 hour');
SQL
    psql -q "$pg/$db" -c checkpoint
    tps=$(pgbench -n -f "$work/$table.sql" -c "$clients" -j 2 -T "$seconds" "$pg/$db" \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    printf '%-28s %8.0f commits/s\n' "$label" "$tps"
}

# relay.publish() takes the lock in one statement; "no lock" is the same function without it.
publish=$(psql -Atq "$pg/$db" -c "select pg_get_functiondef('relay.publish'::regproc)")
unlocked=$(printf '%s\n' "$publish" | sed 's/perform pg_advisory_xact_lock(8243122779093852015);/null;/')
[ "$unlocked" != "$publish" ] || { echo "ceiling.sh: relay.publish() takes no lock to leave out" >&2; exit 1; }
round=1
while [ "$round" -le "$rounds" ]; do
    run plain plain
    run notified notified
    run appointments appointments
    psql -q "$pg/$db" -c "$unlocked"
    run appointments "appointments, no lock"
    psql -q "$pg/$db" -c "$publish"
    round=$((round + 1))
done
