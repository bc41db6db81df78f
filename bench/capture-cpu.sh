#!/bin/sh
# What the capture costs Postgres per commit: CPU time of one backend committing single-row
# inserts into `appointments` (each its own transaction, through the capture and publish
# triggers), with no client round trips in between. A fresh database per round, migrated by the
# relay binary given, so builds can be compared.
#
#   bench/capture-cpu.sh [commits] [rounds]     (needs `cargo build --release -p relay`)
#   RELAY_BIN=/path/to/other/relay bench/capture-cpu.sh
#
# Prints the CPU microseconds per commit of each round. Postgres must run on this machine, outside
# a container: the backend's CPU time is read from /proc by its process id.
set -eu
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
commits=${1:-4000}
rounds=${2:-3}
pg=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
relay=${RELAY_BIN:-$(dirname "$0")/../target/release/relay}
work=$(mktemp -d)
db=relay_capture_cpu_$$
trap 'psql -q "$pg/postgres" -c "drop database if exists $db with (force)" >/dev/null; rm -rf "$work"' EXIT

cat > "$work/measure.sql" <<SQL
select pg_backend_pid() as pid \gset
\setenv PID :pid
\! awk '{print \$14 + \$15}' /proc/\$PID/stat > $work/before
call insert_committing($commits);
\! awk '{print \$14 + \$15}' /proc/\$PID/stat > $work/after
SQL

round=1
while [ "$round" -le "$rounds" ]; do
    psql -q "$pg/postgres" -c "drop database if exists $db with (force)" -c "create database $db"
    DATABASE_URL="$pg/$db" "$relay" migrate >/dev/null
    psql -q "$pg/$db" <<'SQL'
insert into profiles (id, role) values
    ('00000000-0000-4000-8000-00000000d001', 'dentist'),
    ('00000000-0000-4000-8000-00000000b001', 'patient');
create procedure insert_committing(n int) language plpgsql as $$
begin
    for i in 1..n loop
        insert into appointments (id, patient_id, dentist_id, starts_at, ends_at)
        values (gen_random_uuid(), '00000000-0000-4000-8000-00000000b001',
                '00000000-0000-4000-8000-00000000d001', now(), now() + interval '1 hour');
        commit;
    end loop;
end $$;
SQL
    psql -q "$pg/$db" -f "$work/measure.sql" >/dev/null
    # Clock ticks (USER_HZ) to microseconds per commit.
    ticks=$(( $(cat "$work/after") - $(cat "$work/before") ))
    echo "round $round: $(( ticks * 1000000 / $(getconf CLK_TCK) / commits )) µs of CPU per commit"
    round=$((round + 1))
done
