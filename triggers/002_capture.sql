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
-- commit (`new_session`) and as they were before the transaction (`old_session`). It holds a
-- per-session advisory lock while it does (shared for messages, exclusive for a hand-over), so a
-- concurrent hand-over of the session commits wholly before or wholly after. When a session changes
-- hands, its existing messages change readers too: publish() emits, for each of them, an UPDATE
-- event whose row is unchanged and whose old_session/new_session are the session's participants
-- before and after. The relay turns it into a DELETE for whoever lost sight of the message and an
-- INSERT for whoever gained it.
--
-- TRUNCATE is captured as a DELETE of every row it removes.
--
-- Limits, each refused or documented rather than silently wrong:
-- * `SET CONSTRAINTS ALL IMMEDIATE` publishes the changes made so far; a later change to a watched
--   row in the same transaction raises an error (it would otherwise announce a state that might not
--   be the committed one).
-- * Under REPEATABLE READ or SERIALIZABLE, a hand-over lists the session's messages in the
--   transaction's snapshot: a message another transaction commits after that snapshot was taken,
--   and before the hand-over commits, is not moved. Hand sessions over under READ COMMITTED (the
--   default). A message written under those levels raises a serialization failure (40001) if its
--   session was changed since the snapshot.
-- * PREPARE TRANSACTION is refused by Postgres for transactions that NOTIFY.
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

-- One row per transaction with staged changes: its insertion queues the deferred publish trigger,
-- so publish runs once per transaction however many rows it changed.
create unlogged table if not exists relay.pending_tx (
    xid xid8 primary key default pg_current_xact_id()
);

comment on table relay.pending_tx is
    'Transactions in progress with staged changes; each queues one relay.publish() at commit.';

-- Called before staging anything: queues this transaction's publish (once), and refuses changes
-- after an early publish. Publishing normally happens at commit; `SET CONSTRAINTS ALL IMMEDIATE`
-- runs it early, and a change to a watched row after that would publish a state that may not be
-- the committed one.
create or replace function relay.begin_staging(changed_table text) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    if current_setting('relay.published', true) = 'on' then
        raise exception 'relay: % changed after this transaction''s changes were published', changed_table
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'SET CONSTRAINTS ALL IMMEDIATE publishes the changes made so far; '
                         'change watched tables before it, or in another transaction.';
    end if;
    insert into relay.pending_tx default values on conflict do nothing;
end
$$;

-- Records one row's change: the first change of a row in a transaction keeps its `old_row`,
-- every later one only replaces `new_row`.
create or replace function relay.stage(changed_table text, changed_id uuid, before jsonb, after jsonb)
returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform relay.begin_staging(changed_table);
    insert into relay.pending as p (table_name, row_id, seq, old_row, new_row)
    values (changed_table, changed_id, nextval('relay.pending_seq'), before, after)
    on conflict (xid, table_name, row_id) do update set new_row = excluded.new_row;
end
$$;

create or replace function relay.capture_change() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
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

-- TRUNCATE removes every row without row triggers: stage a DELETE for each row it removes.
create or replace function relay.capture_truncate() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform relay.begin_staging(TG_TABLE_NAME);
    execute format(
        'insert into relay.pending as p (table_name, row_id, seq, old_row, new_row)
         select %L, t.id, nextval(''relay.pending_seq''), to_jsonb(t), null from %I.%I t
         on conflict (xid, table_name, row_id) do update set new_row = null',
        TG_TABLE_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME);
    return null;
end
$$;

-- The participants of a session as this transaction sees them at commit; NULL if there is no such
-- session. relay.publish() holds the session's advisory lock (below) while it reads them, so a
-- concurrent hand-over commits wholly before or wholly after; under READ COMMITTED a plain read
-- then sees the latest committed participants. Under REPEATABLE READ or SERIALIZABLE the
-- transaction's snapshot may predate a hand-over: FOR SHARE then raises a serialization failure
-- (40001, retry) rather than return participants that are no longer current. (FOR KEY SHARE would
-- not: it does not conflict with an update of non-key columns and returns the stale version.)
create or replace function relay.session_participants(session_id uuid) returns jsonb
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
declare
    participants jsonb;
begin
    if current_setting('transaction_isolation') = 'read committed' then
        select jsonb_build_object('patient_id', s.patient_id, 'dentist_id', s.dentist_id)
        into participants
        from public.consultation_sessions s where s.id = session_id;
    else
        select jsonb_build_object('patient_id', s.patient_id, 'dentist_id', s.dentist_id)
        into participants
        from public.consultation_sessions s where s.id = session_id
        for share;
    end if;
    return participants;
end
$$;

-- Serializes, per consultation session, the publishing of its messages (shared) against a hand-over
-- of the session (exclusive). Taken at publish only, in one global order, so publishers never
-- deadlock one another; released at commit.
create or replace function relay.lock_sessions(shared uuid[], exclusive uuid[]) returns void
language sql volatile security definer set search_path = pg_catalog, pg_temp
as $$
    select case when bool_or(l.is_exclusive)
                then pg_advisory_xact_lock(1919249505, l.key)::text
                else pg_advisory_xact_lock_shared(1919249505, l.key)::text end
    from (
        select hashtext(id::text) as key, false as is_exclusive from unnest(shared) id
        union all
        select hashtext(id::text), true from unnest(exclusive) id
    ) l
    group by l.key
    order by l.key
$$;

-- Appends one event to the log and notifies the relay.
create or replace function relay.emit(
    table_name text, old_row jsonb, new_row jsonb, old_session jsonb, new_session jsonb)
returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp
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
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    changes relay.pending[];
    change relay.pending;
    -- Participants before this transaction of each session it changed: session id -> participants.
    sessions_before jsonb;
    -- Sessions this transaction hands over, and the messages it changed itself (id -> true).
    handed_over uuid[];
    changed_messages jsonb;
    old_session jsonb;
    new_session jsonb;
    message jsonb;
begin
    delete from relay.pending_tx where xid = pg_current_xact_id();
    with taken as (
        delete from relay.pending p where p.xid = pg_current_xact_id() returning p.*
    )
    select coalesce(array_agg(t order by t.seq), '{}') into changes from taken t;
    perform set_config('relay.published', 'on', true);
    if cardinality(changes) = 0 then
        return null;
    end if;

    select coalesce(jsonb_object_agg(c.row_id::text, jsonb_build_object(
               'patient_id', c.old_row -> 'patient_id', 'dentist_id', c.old_row -> 'dentist_id')), '{}'),
           coalesce(array_agg(c.row_id) filter (where c.new_row is not null
               and (c.old_row -> 'patient_id', c.old_row -> 'dentist_id')
                   is distinct from (c.new_row -> 'patient_id', c.new_row -> 'dentist_id')), '{}')
    into sessions_before, handed_over
    from unnest(changes) c
    where c.table_name = 'consultation_sessions' and c.old_row is not null;

    select coalesce(jsonb_object_agg(c.row_id::text, true), '{}')
    into changed_messages
    from unnest(changes) c
    where c.table_name = 'consultation_messages';

    if changed_messages <> '{}' or cardinality(handed_over) > 0 then
        perform relay.lock_sessions(
            array(select distinct (r ->> 'session_id')::uuid
                  from unnest(changes) c, lateral (values (c.old_row), (c.new_row)) v(r)
                  where c.table_name = 'consultation_messages' and r is not null),
            handed_over);
    end if;

    foreach change in array changes loop
        continue when change.old_row is null and change.new_row is null;  -- born and gone
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
        -- No net change: the same row, read by the same people.
        continue when change.old_row = change.new_row
                  and old_session is not distinct from new_session;
        perform relay.emit(change.table_name, change.old_row, change.new_row, old_session, new_session);

        -- A session that changed hands takes its messages with it. Messages this transaction
        -- changed have their own events, with their readers before and after.
        if change.table_name = 'consultation_sessions' and change.row_id = any(handed_over) then
            old_session := sessions_before -> change.row_id::text;
            new_session := jsonb_build_object('patient_id', change.new_row -> 'patient_id',
                                              'dentist_id', change.new_row -> 'dentist_id');
            for message in
                select to_jsonb(m) from public.consultation_messages m
                where m.session_id = change.row_id and not changed_messages ? m.id::text
                order by m.created_at, m.id
            loop
                perform relay.emit('consultation_messages', message, message, old_session, new_session);
            end loop;
        end if;
    end loop;
    return null;
end
$$;

revoke all on function relay.begin_staging(text) from public;
revoke all on function relay.stage(text, uuid, jsonb, jsonb) from public;
revoke all on function relay.capture_change() from public;
revoke all on function relay.session_participants(uuid) from public;
revoke all on function relay.emit(text, jsonb, jsonb, jsonb, jsonb) from public;
revoke all on function relay.publish() from public;
revoke all on function relay.capture_truncate() from public;
revoke all on function relay.lock_sessions(uuid[], uuid[]) from public;

drop trigger if exists relay_publish on relay.pending_tx;
create constraint trigger relay_publish
    after insert on relay.pending_tx
    deferrable initially deferred
    for each row execute function relay.publish();

create or replace trigger relay_capture
    after insert or update or delete on public.appointments
    for each row execute function relay.capture_change();
create or replace trigger relay_capture_truncate
    before truncate on public.appointments
    for each statement execute function relay.capture_truncate();
create or replace trigger relay_capture
    after insert or update or delete on public.availability
    for each row execute function relay.capture_change();
create or replace trigger relay_capture_truncate
    before truncate on public.availability
    for each statement execute function relay.capture_truncate();
create or replace trigger relay_capture
    after insert or update or delete on public.consultation_sessions
    for each row execute function relay.capture_change();
create or replace trigger relay_capture_truncate
    before truncate on public.consultation_sessions
    for each statement execute function relay.capture_truncate();
create or replace trigger relay_capture
    after insert or update or delete on public.consultation_messages
    for each row execute function relay.capture_change();
create or replace trigger relay_capture_truncate
    before truncate on public.consultation_messages
    for each statement execute function relay.capture_truncate();
