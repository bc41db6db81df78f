-- 010_hand_over_isolation.sql: a consultation session handed over (its patient or dentist
-- changed) under REPEATABLE READ or SERIALIZABLE is refused.
--
-- A hand-over announces each of the session's messages to whoever loses and whoever gains it, and
-- lists them in the transaction's snapshot. Under READ COMMITTED, the default, that snapshot is
-- taken after the hand-over holds the session's exclusive advisory lock, which every message's
-- insert takes shared first (triggers/002_capture.sql), so it holds every message committed
-- before. Under REPEATABLE READ or SERIALIZABLE it is the transaction's first snapshot: a message
-- committed after it, and before the hand-over, would stay with the old participants' feeds and
-- never reach the new ones. The change is refused instead (SQLSTATE 55000), as TRUNCATE is under
-- those levels (009_truncate.sql); the same UPDATE under READ COMMITTED is captured in full.

create or replace function relay.refuse_hand_over_outside_read_committed() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp
as $$
begin
    -- READ UNCOMMITTED is READ COMMITTED in Postgres.
    if current_setting('transaction_isolation') not in ('read committed', 'read uncommitted') then
        raise exception 'relay: consultation session % handed over under % cannot move every message',
                old.id, upper(current_setting('transaction_isolation'))
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'Change a session''s patient or dentist under READ COMMITTED (the default).';
    end if;
    return new;
end
$$;

drop trigger if exists relay_hand_over_isolation on public.consultation_sessions;
create trigger relay_hand_over_isolation
    before update of patient_id, dentist_id on public.consultation_sessions
    for each row
    when (old.patient_id is distinct from new.patient_id
          or old.dentist_id is distinct from new.dentist_id)
    execute function relay.refuse_hand_over_outside_read_committed();
