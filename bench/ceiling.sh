#!/bin/sh
# Postgres' own ceiling for single-row transactions on this machine, three ways: a plain insert,
# an insert with a minimal per-row NOTIFY trigger (the physical limit of any NOTIFY design), and
# an insert into `appointments` through the relay's capture (event log, commit-order lock, one
# NOTIFY per event). No relay attached.
#
#   bench/ceiling.sh [clients] [seconds]      (needs `cargo build --release -p relay`)
set -eu
clients=${1:-8}
seconds=${2:-10}
pg=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
relay=${RELAY_BIN:-$(dirname "$0")/../target/release/relay}
db=relay_ceiling_$$
work=$(mktemp -d)
trap 'psql -q "$pg/postgres" -c "drop database if exists $db with (force)" >/dev/null; rm -rf "$work"' EXIT

psql -q "$pg/postgres" -c "create database $db"
DATABASE_URL="$pg/$db" "$relay" migrate >/dev/null
psql -q "$pg/$db" <<'SQL'
insert into profiles (id, role) values
    ('00000000-0000-4000-8000-00000000d001', 'dentist'),
    ('00000000-0000-4000-8000-00000000b001', 'patient');
-- The same columns, keys, indexes, checks and foreign keys as appointments; only the triggers differ.
create table plain (like appointments including all);
create table notified (like appointments including all);
alter table plain add foreign key (patient_id) references profiles,
                  add foreign key (dentist_id) references profiles;
alter table notified add foreign key (patient_id) references profiles,
                     add foreign key (dentist_id) references profiles;
create function notify_row() returns trigger language plpgsql as $$
begin
    perform pg_notify('ceiling', row_to_json(new)::text);
    return null;
end $$;
create trigger notify_row after insert on notified for each row execute function notify_row();
SQL

for table in plain notified appointments; do
    cat > "$work/$table.sql" <<SQL
insert into $table (id, patient_id, dentist_id, starts_at, ends_at)
values (gen_random_uuid(), '00000000-0000-4000-8000-00000000b001',
        '00000000-0000-4000-8000-00000000d001', now(), now() + interval '1 hour');
SQL
    tps=$(pgbench -n -f "$work/$table.sql" -c "$clients" -j 2 -T "$seconds" "$pg/$db" \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    printf '%-14s %8.0f commits/s\n' "$table" "$tps"
done
