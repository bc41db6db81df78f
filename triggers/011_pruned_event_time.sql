-- 011_pruned_event_time.sql: retention keeps the time of the last event it deleted.
--
-- An event's cursor names it by its id and a hash of its time (`at`, as its frames carry it), so
-- that after the log went back (a restore, a failover that lost commits) a cursor of an event the
-- log no longer holds is refused even once another event has taken its id. A cursor at the
-- retention horizon names an event retention deleted: with its time kept here, the relay can
-- still tell whether it was that event (nothing after it is lost) or another one.

alter table relay.log_horizon add column if not exists pruned_through_at text;

comment on column relay.log_horizon.pruned_through_at is
    'The time of event pruned_through as its frames carry it; null if pruned before this column.';

create or replace function relay.prune_events(cutoff timestamptz, batch integer) returns bigint
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
declare
    upto bigint;
    upto_at text;
    deleted bigint;
begin
    select max(e.id) into upto
    from (select id, at from relay.events order by id limit batch) e
    where e.at < cutoff;
    if upto is null then
        return 0;
    end if;
    select to_char(e.at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') into upto_at
    from relay.events e where e.id = upto;
    delete from relay.events where id <= upto;
    get diagnostics deleted = row_count;
    update relay.log_horizon set pruned_through = upto, pruned_through_at = upto_at
    where pruned_through < upto;
    return deleted;
end
$$;

revoke all on function relay.prune_events(timestamptz, integer) from public;
