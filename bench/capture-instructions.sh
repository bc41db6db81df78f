#!/bin/sh
# What one single-row commit costs a Postgres backend, in instructions, counted by callgrind:
# repeatable to within a fraction of a percent whatever else the machine is doing, where CPU time
# (bench/capture-cpu.sh) varies by ±15 % between rounds. Three inserts are measured, as in
# bench/ceiling.sh: into a table with no trigger, into one with a minimal per-row NOTIFY trigger,
# and into `appointments` through the relay's capture.
#
#   bench/capture-instructions.sh [commits]    (needs valgrind and `cargo build --release -p relay`)
#   RELAY_BIN=/path/to/other/relay bench/capture-instructions.sh
#
# It sets up its own throwaway cluster (initdb, on a free port, fsync off), migrates it with the
# relay binary given, then runs a backend in single-user mode under callgrind twice per table, for
# 100 and for 100 + `commits` commits: the difference divided by `commits` is the cost of a commit,
# start-up and the first statements' planning left out. Each commit books a different dentist and
# patient, as relay-bench's writers do. Postgres refuses to run as root: as root, the cluster runs
# as the user `postgres`.
set -eu
commits=${1:-1000}
relay=$(realpath "${RELAY_BIN:-$(dirname "$0")/../target/release/relay}")
bin=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | tail -1)
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
[ "$(id -u)" = 0 ] && chown postgres "$work"
trap 'as_owner "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

as_owner "$bin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
as_owner "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
url="postgres://postgres@127.0.0.1:$port"
psql -q "$url/postgres" -c "create database bench"
DATABASE_URL="$url/bench" "$relay" migrate >/dev/null
psql -q "$url/bench" -f "$(dirname "$0")/ceiling-tables.sql"
# One procedure per table, with the insert written out: a dynamic statement would be planned again
# on every commit, and that cost would swamp the differences measured.
for table in plain notified appointments; do
    psql -q "$url/bench" <<SQL
create procedure insert_$table(n int) language plpgsql as \$\$
begin
    for i in 1..n loop
        insert into $table (patient_id, dentist_id, starts_at, ends_at)
        values (('00000000-0000-4000-8000-' || lpad((1001 + i % 10000)::text, 12, '0'))::uuid,
                ('00000000-0000-4000-8000-' || lpad((1 + i % 1000)::text, 12, '0'))::uuid,
                now(), now() + interval '1 hour');
        commit;
    end loop;
end \$\$;
SQL
done
as_owner "$bin/pg_ctl" -D "$work/data" -w stop >/dev/null
cp -a "$work/data" "$work/seeded"

# Instructions of one single-user backend calling insert_$1($2), on a fresh copy of the seeded
# cluster.
count() {
    rm -rf "$work/data"
    cp -a "$work/seeded" "$work/data"
    echo "call insert_$1($2);" > "$work/in.sql"
    as_owner valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
        "$bin/postgres" --single -D "$work/data" -c fsync=off bench < "$work/in.sql" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

for table in plain notified appointments; do
    short=$(count "$table" 100)
    long=$(count "$table" $((100 + commits)))
    printf '%-14s %9d instructions per commit\n' "$table" $(((long - short) / commits))
done
