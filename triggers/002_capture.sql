-- 002_capture.sql: the trigger that records each change and notifies the relay.
--
-- After every INSERT, UPDATE and DELETE on the four watched tables, relay.capture_change()
-- appends the change to relay.events and sends one NOTIFY on the channel `relay_events` with a
-- JSON payload:
--
--   {"id": 42, "table": "appointments", "op": "UPDATE", "xid": "1234", "at": "2026-...Z",
--    "new": {...row...}, "old": {...row...}, "new_session": null, "old_session": null}
--
-- NOTIFY payloads must be shorter than 8000 bytes. When the full payload would not fit (a long
-- `notes` or message body), the trigger sends the same object without the rows and with
-- "fetch": true, and the relay reads the event from relay.events by id. The writer's transaction
-- never fails because of a row's size.
--
-- SECURITY DEFINER: writers need no privileges on the relay schema, and the session lookup for a
-- message is not limited by the writer's row-level security.

create or replace function relay.session_participants(session_id uuid) returns jsonb
language sql stable security definer set search_path = pg_catalog, public
as $$
    select jsonb_build_object('patient_id', s.patient_id, 'dentist_id', s.dentist_id)
    from public.consultation_sessions s
    where s.id = session_id
$$;

create or replace function relay.capture_change() returns trigger
language plpgsql security definer set search_path = pg_catalog, public
as $$
declare
    new_row jsonb := case when TG_OP <> 'DELETE' then to_jsonb(NEW) end;
    old_row jsonb := case when TG_OP <> 'INSERT' then to_jsonb(OLD) end;
    new_session jsonb;
    old_session jsonb;
    ev relay.events;
    header jsonb;
    payload text;
begin
    if TG_TABLE_NAME = 'consultation_messages' then
        new_session := relay.session_participants((new_row ->> 'session_id')::uuid);
        old_session := relay.session_participants((old_row ->> 'session_id')::uuid);
    end if;

    insert into relay.events (table_name, op, new_row, old_row, new_session, old_session)
    values (TG_TABLE_NAME, TG_OP, new_row, old_row, new_session, old_session)
    returning * into ev;

    header := jsonb_build_object(
        'id', ev.id,
        'table', ev.table_name,
        'op', ev.op,
        'xid', ev.xid::text,
        'at', to_char(ev.at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    payload := (header || jsonb_build_object(
        'new', ev.new_row, 'old', ev.old_row,
        'new_session', ev.new_session, 'old_session', ev.old_session))::text;
    if octet_length(payload) >= 8000 then
        payload := (header || jsonb_build_object('fetch', true))::text;
    end if;
    perform pg_notify('relay_events', payload);
    return null;
end
$$;

create or replace trigger relay_capture
    after insert or update or delete on public.appointments
    for each row execute function relay.capture_change();
create or replace trigger relay_capture
    after insert or update or delete on public.availability
    for each row execute function relay.capture_change();
create or replace trigger relay_capture
    after insert or update or delete on public.consultation_sessions
    for each row execute function relay.capture_change();
create or replace trigger relay_capture
    after insert or update or delete on public.consultation_messages
    for each row execute function relay.capture_change();
