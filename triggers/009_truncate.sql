-- 009_truncate.sql: TRUNCATE of a watched table, captured in full or refused.
--
-- Two cases lost changes before (triggers/008_single_change.sql's relay.capture_truncate()):
--
-- * A TRUNCATE of an empty watched table, first in its transaction, marked the transaction as
--   having staged something though it had staged no row, and so had queued no publish. Every later
--   change in the transaction then took publish to be queued: `begin; truncate availability;
--   insert into appointments ...; commit` committed the appointment and published nothing, and left
--   its staged row behind. The mark is now set only when the TRUNCATE staged rows.
-- * The rows to announce are listed by a query in the transaction's snapshot. Under READ
--   COMMITTED that snapshot is taken after TRUNCATE holds its exclusive lock, so it sees every row
--   TRUNCATE removes. Under REPEATABLE READ or SERIALIZABLE it is the transaction's first one:
--   rows committed since would go without a DELETE, and rows deleted since would get a second one.
--   Such a TRUNCATE is refused (SQLSTATE 55000); under READ COMMITTED, the default, or as DELETE,
--   the same change is captured in full.

create or replace function relay.capture_truncate() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    staged_rows bigint;
begin
    -- The same refusal as relay.stage()'s (see 008_single_change.sql).
    if current_setting('relay.published', true) = 'on' then
        raise exception 'relay: % changed after this transaction''s changes were published', TG_TABLE_NAME
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'SET CONSTRAINTS ALL IMMEDIATE publishes the changes made so far; '
                         'change watched tables before it, or in another transaction.';
    end if;
    -- READ UNCOMMITTED is READ COMMITTED in Postgres.
    if current_setting('transaction_isolation') not in ('read committed', 'read uncommitted') then
        raise exception 'relay: TRUNCATE of % under % cannot list every row it removes',
                TG_TABLE_NAME, upper(current_setting('transaction_isolation'))
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'Truncate watched tables under READ COMMITTED (the default), or use DELETE.';
    end if;
    execute format(
        'insert into relay.pending as p (table_name, row_id, seq, old_row, new_row, queues_publish)
         select %L, t.id, nextval(''relay.pending_seq''), to_jsonb(t), null,
                row_number() over () = 1 and %L
         from %I.%I t
         on conflict (xid, table_name, row_id) do update set new_row = null',
        TG_TABLE_NAME, coalesce(current_setting('relay.staged', true), '') = '',
        TG_TABLE_SCHEMA, TG_TABLE_NAME);
    get diagnostics staged_rows = row_count;
    -- Nothing staged, nothing queued: the transaction's next change is still its first.
    if staged_rows > 0 then
        perform set_config('relay.staged', 'on', true);
    end if;
    return null;
end
$$;

revoke all on function relay.capture_truncate() from public;
