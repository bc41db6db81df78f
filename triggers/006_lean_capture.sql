-- 006_lean_capture.sql: the same capture and the same events, with a quarter less work per commit.
--
-- What a single-row commit cost its backend was counted with callgrind
-- (bench/capture-instructions.sh; BENCHMARKS.md, "A leaner capture"): about 1.07 million
-- instructions through the capture, against 0.33 million for a bare NOTIFY trigger. Most of the
-- difference was machinery around the two steps rather than the steps themselves:
--
-- * A second staging table. Each transaction inserted a row into relay.pending_tx only to queue
--   relay.publish() once, and publish deleted it again. The first row a transaction stages in
--   relay.pending now queues publish itself: the constraint trigger moves to relay.pending, with
--   `WHEN (NEW.queues_publish)`, and stage() sets that column on the transaction's first staged
--   row only (a transaction-local setting, `relay.staged`, remembers it; like the staged rows and
--   the queued trigger, it is undone by a rollback to a savepoint, so a transaction whose first
--   staging was rolled back queues publish again with its next one).
-- * Privilege switches. relay.stage(), relay.emit() and relay.lock_commit_order() were SECURITY
--   DEFINER with their own search_path, so every call saved, switched and restored the user and
--   the setting, and looked names up again. They are only ever called by the trigger functions,
--   which are SECURITY DEFINER with a fixed search_path themselves: the helpers now run as
--   invoked, with their caller's rights and search_path. EXECUTE on them stays revoked from
--   PUBLIC, so no one else can call them.
-- * Building the payload as jsonb. emit() built the NOTIFY payload as a jsonb object, merged two
--   of them and printed the result; it now writes the text directly. The payload has the same
--   keys and values (the relay reads it by name, not by position).
-- * Indexes no reader uses. relay.events had indexes on `xid` and `at`; the relay reads the log by
--   id only, and retention deletes by id too (relay.prune_events). Each was one more index entry,
--   written while the commit-order lock is held.
-- * A text round trip of every staged row. publish() gathered the staged rows as anonymous
--   records, which PL/pgSQL converted to relay.pending[] through their text form, printing and
--   parsing every row's JSON again; `returning p` keeps the rows' own type.
--
-- Staging, publishing and their order are otherwise unchanged (triggers/002_capture.sql,
-- 003_commit_order.sql and 005_publish_cost.sql explain them).

alter table relay.pending add column if not exists queues_publish boolean not null default false;

comment on column relay.pending.queues_publish is
    'True on the first row a transaction stages: its insertion queues relay.publish() at commit.';

-- Refuses changes after an early publish (see 002_capture.sql), and stages one row's change. The
-- first change of a row in a transaction keeps its `old_row`; every later one replaces `new_row`.
create or replace function relay.stage(changed_table text, changed_id uuid, before jsonb, after jsonb)
returns void
language plpgsql security invoker
as $$
begin
    if current_setting('relay.published', true) = 'on' then
        raise exception 'relay: % changed after this transaction''s changes were published', changed_table
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'SET CONSTRAINTS ALL IMMEDIATE publishes the changes made so far; '
                         'change watched tables before it, or in another transaction.';
    end if;
    insert into relay.pending as p (table_name, row_id, seq, old_row, new_row, queues_publish)
    values (changed_table, changed_id, nextval('relay.pending_seq'), before, after,
            current_setting('relay.staged', true) is distinct from 'on')
    on conflict (xid, table_name, row_id) do update set new_row = excluded.new_row;
    perform set_config('relay.staged', 'on', true);
end
$$;

create or replace function relay.capture_truncate() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    -- The same refusal as relay.stage()'s, written out in both: as a shared helper, the call in
    -- stage() cost every single-row commit 13,700 more instructions (bench/capture-instructions.sh).
    if current_setting('relay.published', true) = 'on' then
        raise exception 'relay: % changed after this transaction''s changes were published', TG_TABLE_NAME
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'SET CONSTRAINTS ALL IMMEDIATE publishes the changes made so far; '
                         'change watched tables before it, or in another transaction.';
    end if;
    execute format(
        'insert into relay.pending as p (table_name, row_id, seq, old_row, new_row, queues_publish)
         select %L, t.id, nextval(''relay.pending_seq''), to_jsonb(t), null,
                row_number() over () = 1 and %L
         from %I.%I t
         on conflict (xid, table_name, row_id) do update set new_row = null',
        TG_TABLE_NAME, current_setting('relay.staged', true) is distinct from 'on',
        TG_TABLE_SCHEMA, TG_TABLE_NAME);
    perform set_config('relay.staged', 'on', true);
    return null;
end
$$;

create or replace function relay.lock_commit_order() returns void
language plpgsql volatile security invoker
as $$
begin
    perform pg_advisory_xact_lock(8243122779093852015);
end
$$;

-- Writes one event and queues its notification. The payload is the event as JSON; when it would
-- not fit NOTIFY's limit, the same header with "fetch": true instead of the rows.
create or replace function relay.emit(
    table_name text, old_row jsonb, new_row jsonb, old_session jsonb, new_session jsonb)
returns void
language plpgsql security invoker
as $$
declare
    op text := case when old_row is null then 'INSERT' when new_row is null then 'DELETE' else 'UPDATE' end;
    id bigint;
    xid xid8;
    at timestamptz;
    header text;
    payload text;
begin
    insert into relay.events as e (table_name, op, new_row, old_row, new_session, old_session)
    values (table_name, op, new_row, old_row, new_session, old_session)
    returning e.id, e.xid, e.at into id, xid, at;

    header := '{"id":' || id || ',"table":' || to_json(table_name) || ',"op":"' || op
        || '","xid":"' || xid || '","at":"'
        || to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"';
    payload := header
        || ',"new":' || coalesce(new_row::text, 'null')
        || ',"old":' || coalesce(old_row::text, 'null')
        || ',"new_session":' || coalesce(new_session::text, 'null')
        || ',"old_session":' || coalesce(old_session::text, 'null') || '}';
    if octet_length(payload) >= 8000 then
        payload := header || ',"fetch":true}';
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
    -- Participants at commit of every session a changed message belongs to.
    sessions_now jsonb;
    -- Sessions this transaction hands over, and the messages it changed itself (id -> true).
    handed_over uuid[];
    changed_messages jsonb;
    old_session jsonb;
    new_session jsonb;
    message jsonb;
    -- Whether the transaction changed consultations, whose events need their sessions' readers.
    consultations boolean;
begin
    -- `returning p` keeps the rows' own type; an array of the CTE's anonymous rows would be
    -- converted to relay.pending[] through text, every jsonb printed and parsed again.
    with taken as (
        delete from relay.pending p where p.xid = pg_current_xact_id() returning p
    )
    select coalesce(array_agg(t.p order by (t.p).seq), '{}'),
           coalesce(bool_or((t.p).table_name in ('consultation_sessions', 'consultation_messages')), false)
    into changes, consultations
    from taken t;
    perform set_config('relay.published', 'on', true);
    if cardinality(changes) = 0 then
        return null;
    end if;

    sessions_before := '{}';
    handed_over := '{}';
    changed_messages := '{}';
    sessions_now := '{}';
    if consultations then
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
            select coalesce(jsonb_object_agg(s.id::text, relay.session_participants(s.id)), '{}')
            into sessions_now
            from (select distinct (r ->> 'session_id')::uuid as id
                  from unnest(changes) c, lateral (values (c.old_row), (c.new_row)) v(r)
                  where c.table_name = 'consultation_messages' and r is not null) s;
        end if;
    end if;

    -- From here to commit, no other transaction draws event ids. Nothing else is done under the
    -- lock but drawing them, writing the events and queueing their notifications: the payloads'
    -- rows are rendered in relay.emit() with the id spliced in.
    perform relay.lock_commit_order();

    foreach change in array changes loop
        continue when change.old_row is null and change.new_row is null;  -- born and gone
        old_session := null;
        new_session := null;
        if change.table_name = 'consultation_messages' then
            if change.old_row is not null then
                old_session := coalesce(sessions_before -> (change.old_row ->> 'session_id'),
                                        sessions_now -> (change.old_row ->> 'session_id'));
            end if;
            if change.new_row is not null then
                new_session := sessions_now -> (change.new_row ->> 'session_id');
            end if;
            -- A session that does not exist (any more) has no participants.
            if old_session = 'null'::jsonb then old_session := null; end if;
            if new_session = 'null'::jsonb then new_session := null; end if;
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

revoke all on function relay.stage(text, uuid, jsonb, jsonb) from public;
revoke all on function relay.capture_truncate() from public;
revoke all on function relay.lock_commit_order() from public;
revoke all on function relay.emit(text, jsonb, jsonb, jsonb, jsonb) from public;
revoke all on function relay.publish() from public;

drop trigger if exists relay_publish on relay.pending;
create constraint trigger relay_publish
    after insert on relay.pending
    deferrable initially deferred
    for each row
    when (new.queues_publish)
    execute function relay.publish();

drop table if exists relay.pending_tx;
drop function if exists relay.begin_staging(text);

drop index if exists relay.events_xid_idx;
drop index if exists relay.events_at_idx;
