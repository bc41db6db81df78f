-- 002_capture.sql: turning committed changes into events and notifying the relay.
--
-- Subscribers must only ever learn of committed states of rows: a row inserted for one dentist and
-- moved to another in the same transaction was never the first dentist's, and must not be
-- announced to them. So capture has two steps:
--
-- 1. Stage. After each INSERT, UPDATE and DELETE on the four watched tables, relay.capture_change()
--    records the row's net change within the transaction in relay.pending: its version before the
--    transaction (its first OLD) and its latest version (its last NEW, or none once deleted).
--    Staged rows belong to the transaction: a rollback (or a rollback to a savepoint) undoes them.
--
-- 2. Publish. A deferred constraint trigger runs relay.publish() at commit, once the transaction's
--    statements are done. It turns each staged row into one event in relay.events, in the order
--    rows were first changed, and sends one NOTIFY per event on the channel `relay_events`:
--
--      {"id": 42, "table": "appointments", "op": "UPDATE", "xid": "1234", "at": "2026-...Z",
--       "new": {...row...}, "old": {...row...}, "new_session": null, "old_session": null}
--
--    A row inserted and deleted in the same transaction, or updated back to what it was, makes no
--    event. NOTIFY delivers at commit in commit order, so the relay receives events in commit order.
--
-- Consultation messages: a message's readers are its session's participants (see
-- sql/003_row_level_security.sql). publish() records them with each message event as they are at
-- commit (`new_session`) and as they were before the transaction (`old_session`), reading the
-- session FOR SHARE so that a concurrent change of hands commits either wholly before or wholly
-- after this transaction. When a session changes hands, its existing messages change readers too:
-- publish() emits, for each of them, an UPDATE event whose row is unchanged and whose
-- old_session/new_session are the session's participants before and after. The relay turns it into
-- a DELETE for whoever lost sight of the message and an INSERT for whoever gained it.
--
-- NOTIFY payloads must be shorter than 8000 bytes. When the full payload would not fit (a long
-- `notes` or message body), the NOTIFY carries the same object without the rows and with
-- "fetch": true, and the relay reads the event from relay.events by id. The writer's transaction
-- never fails because of a row's size.
--
-- The functions are SECURITY DEFINER with a fixed search_path: writers need no privileges on the
-- relay schema, and session lookups are not limited by the writer's row-level security. No one but
-- the owner may call them directly.

create unlogged table if not exists relay.pending (
    xid        xid8 not null default pg_current_xact_id(),
    table_name text not null,
    row_id     uuid not null,
    -- Order of the row's first change within the transaction.
    seq        bigint not null,
    -- The row before the transaction (NULL if it did not exist) and its latest version (NULL once
    -- deleted).
    old_row    jsonb,
    new_row    jsonb,
    primary key (xid, table_name, row_id)
);
create sequence if not exists relay.pending_seq;

comment on table relay.pending is
    'Net row changes of transactions in progress; emptied by relay.publish() at their commit.';

-- Records one row's change: the first change of a row in a transaction keeps its `old_row`,
-- every later one only replaces `new_row`.
create or replace function relay.stage(table_name text, row_id uuid, old_row jsonb, new_row jsonb)
returns void
language sql security definer set search_path = pg_catalog, public
as $$
    insert into relay.pending as p (table_name, row_id, seq, old_row, new_row)
    values (table_name, row_id, nextval('relay.pending_seq'), old_row, new_row)
    on conflict (xid, table_name, row_id) do update set new_row = excluded.new_row
$$;

create or replace function relay.capture_change() returns trigger
language plpgsql security definer set search_path = pg_catalog, public
as $$
begin
    if TG_OP = 'INSERT' then
        perform relay.stage(TG_TABLE_NAME, NEW.id, null, to_jsonb(NEW));
    elsif TG_OP = 'DELETE' then
        perform relay.stage(TG_TABLE_NAME, OLD.id, to_jsonb(OLD), null);
    elsif OLD.id = NEW.id then
        perform relay.stage(TG_TABLE_NAME, NEW.id, to_jsonb(OLD), to_jsonb(NEW));
    else
        -- A changed primary key: the old row is gone and a new one exists.
        perform relay.stage(TG_TABLE_NAME, OLD.id, to_jsonb(OLD), null);
        perform relay.stage(TG_TABLE_NAME, NEW.id, null, to_jsonb(NEW));
    end if;
    return null;
end
$$;

-- The participants of a session as this transaction sees them at commit, locked FOR SHARE until
-- the commit so that no concurrent transaction changes them in between. NULL if there is no such
-- session.
create or replace function relay.session_participants(session_id uuid) returns jsonb
language sql volatile security definer set search_path = pg_catalog, public
as $$
    select jsonb_build_object('patient_id', s.patient_id, 'dentist_id', s.dentist_id)
    from public.consultation_sessions s
    where s.id = session_id
    for share
$$;

-- Appends one event to the log and notifies the relay.
create or replace function relay.emit(
    table_name text, old_row jsonb, new_row jsonb, old_session jsonb, new_session jsonb)
returns void
language plpgsql security definer set search_path = pg_catalog, public
as $$
declare
    ev relay.events;
    header jsonb;
    payload text;
begin
    insert into relay.events (table_name, op, new_row, old_row, new_session, old_session)
    values (table_name,
            case when old_row is null then 'INSERT' when new_row is null then 'DELETE' else 'UPDATE' end,
            new_row, old_row, new_session, old_session)
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
end
$$;

create or replace function relay.publish() returns trigger
language plpgsql security definer set search_path = pg_catalog, public
as $$
declare
    changes relay.pending[];
    change relay.pending;
    -- Participants before this transaction of each session it changed: session id -> participants.
    sessions_before jsonb;
    old_session jsonb;
    new_session jsonb;
    message jsonb;
begin
    -- The first deferred firing of a transaction publishes all of it; later ones find nothing.
    with taken as (
        delete from relay.pending p where p.xid = pg_current_xact_id() returning p.*
    )
    select coalesce(array_agg(t order by t.seq), '{}') into changes from taken t;
    if cardinality(changes) = 0 then
        return null;
    end if;

    select coalesce(jsonb_object_agg(c.row_id::text, jsonb_build_object(
               'patient_id', c.old_row -> 'patient_id', 'dentist_id', c.old_row -> 'dentist_id')), '{}')
    into sessions_before
    from unnest(changes) c
    where c.table_name = 'consultation_sessions' and c.old_row is not null;

    foreach change in array changes loop
        continue when change.old_row is null and change.new_row is null;  -- born and gone
        continue when change.old_row = change.new_row;                     -- no net change
        old_session := null;
        new_session := null;
        if change.table_name = 'consultation_messages' then
            if change.old_row is not null then
                old_session := coalesce(sessions_before -> (change.old_row ->> 'session_id'),
                                        relay.session_participants((change.old_row ->> 'session_id')::uuid));
            end if;
            if change.new_row is not null then
                new_session := relay.session_participants((change.new_row ->> 'session_id')::uuid);
            end if;
        end if;
        perform relay.emit(change.table_name, change.old_row, change.new_row, old_session, new_session);

        -- A session that changed hands takes its messages with it. Messages this transaction
        -- changed have their own events, with their readers before and after.
        if change.table_name = 'consultation_sessions' and change.old_row is not null
           and change.new_row is not null
           and (change.old_row -> 'patient_id', change.old_row -> 'dentist_id')
               is distinct from (change.new_row -> 'patient_id', change.new_row -> 'dentist_id') then
            old_session := sessions_before -> change.row_id::text;
            new_session := jsonb_build_object('patient_id', change.new_row -> 'patient_id',
                                              'dentist_id', change.new_row -> 'dentist_id');
            for message in
                select to_jsonb(m) from public.consultation_messages m
                where m.session_id = change.row_id
                  and not exists (select 1 from unnest(changes) c
                                  where c.table_name = 'consultation_messages' and c.row_id = m.id)
                order by m.created_at, m.id
            loop
                perform relay.emit('consultation_messages', message, message, old_session, new_session);
            end loop;
        end if;
    end loop;
    return null;
end
$$;

revoke all on function relay.stage(text, uuid, jsonb, jsonb) from public;
revoke all on function relay.capture_change() from public;
revoke all on function relay.session_participants(uuid) from public;
revoke all on function relay.emit(text, jsonb, jsonb, jsonb, jsonb) from public;
revoke all on function relay.publish() from public;

drop trigger if exists relay_publish on relay.pending;
create constraint trigger relay_publish
    after insert on relay.pending
    deferrable initially deferred
    for each row execute function relay.publish();

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
