-- 008_single_change.sql: the same capture and the same events, with about 9 % less work for a
-- transaction that changes one watched row.
--
-- Most transactions change one row. Counted with callgrind (bench/capture-instructions.sh;
-- BENCHMARKS.md, "One staged change"), such a commit cost its backend 738,500 instructions.
-- 50,000 of them went to machinery that only matters when a transaction stages several rows, and
-- 17,000 to the way the payload was written:
--
-- * Merging with what is already staged. The first change of a transaction cannot meet a staged
--   row, and no publish can have run before it (an early publish needs a staged row). It is staged
--   with a plain INSERT, without ON CONFLICT, without the check for an early publish, and with seq 0
--   rather than a value drawn from relay.pending_seq (later rows draw larger ones, so the order by
--   first change holds).
-- * Gathering and ordering at publish. `relay.staged` now says how much is staged: 'one' after
--   that first change, 'on' once anything else is staged (later changes, a changed primary key,
--   a TRUNCATE), unset or empty before. With 'one', publish deletes and takes the single row
--   directly instead of aggregating the transaction's rows in order.
-- * Starting the consultations' bookkeeping for transactions without consultations.
-- * Building the payload with a chain of ||. PL/pgSQL sets up every expression it evaluates once
--   per transaction, node by node; one call of format() writes the same text with fewer nodes
--   (17,000 instructions less). relay.emit() builds it the same way.
--
-- Like the staged rows and the queued trigger, `relay.staged` is undone by a rollback to a
-- savepoint, so the three agree. The events, their order and the refusal after an early publish are
-- unchanged (triggers/002_capture.sql to 007_fewer_calls.sql explain them).

-- Refuses changes after an early publish (see 002_capture.sql), and stages one row's change. The
-- first change of a row in a transaction keeps its `old_row`; every later one replaces `new_row`.
-- capture_change() calls it for a changed primary key, which stages two rows.
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
            coalesce(current_setting('relay.staged', true), '') = '')
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
        TG_TABLE_NAME, coalesce(current_setting('relay.staged', true), '') = '',
        TG_TABLE_SCHEMA, TG_TABLE_NAME);
    perform set_config('relay.staged', 'on', true);
    return null;
end
$$;

create or replace function relay.capture_change() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    staged text := current_setting('relay.staged', true);
begin
    if TG_OP = 'UPDATE' and OLD.id <> NEW.id then
        -- A changed primary key: the old row is gone and a new one exists.
        perform relay.stage(TG_TABLE_NAME, OLD.id, to_jsonb(OLD), null);
        perform relay.stage(TG_TABLE_NAME, NEW.id, null, to_jsonb(NEW));
        return null;
    end if;
    if coalesce(staged, '') = '' then
        -- The transaction's first change: no staged row to merge with, and nothing published yet
        -- (an early publish needs a staged row). A plain insert, first in order; it queues publish.
        insert into relay.pending (table_name, row_id, seq, old_row, new_row, queues_publish)
        values (TG_TABLE_NAME,
                case when TG_OP = 'DELETE' then OLD.id else NEW.id end,
                0,
                case when TG_OP <> 'INSERT' then to_jsonb(OLD) end,
                case when TG_OP <> 'DELETE' then to_jsonb(NEW) end,
                true);
        perform set_config('relay.staged', 'one', true);
        return null;
    end if;
    -- relay.stage(), written out (OLD is null in an INSERT, NEW in a DELETE). As a call, it cost
    -- every single-row commit 14,000 more instructions (bench/capture-instructions.sh).
    if current_setting('relay.published', true) = 'on' then
        raise exception 'relay: % changed after this transaction''s changes were published', TG_TABLE_NAME
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'SET CONSTRAINTS ALL IMMEDIATE publishes the changes made so far; '
                         'change watched tables before it, or in another transaction.';
    end if;
    insert into relay.pending as p (table_name, row_id, seq, old_row, new_row, queues_publish)
    values (TG_TABLE_NAME,
            case when TG_OP = 'DELETE' then OLD.id else NEW.id end,
            nextval('relay.pending_seq'),
            case when TG_OP <> 'INSERT' then to_jsonb(OLD) end,
            case when TG_OP <> 'DELETE' then to_jsonb(NEW) end,
            false)
    on conflict (xid, table_name, row_id) do update set new_row = excluded.new_row;
    if staged = 'one' then
        perform set_config('relay.staged', 'on', true);
    end if;
    return null;
end
$$;

-- Writes one event and queues its notification (see 006_lean_capture.sql), its payload built as in
-- publish() below. publish() calls it for the messages of a session handed over.
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
    payload text;
begin
    insert into relay.events as e (table_name, op, new_row, old_row, new_session, old_session)
    values (table_name, op, new_row, old_row, new_session, old_session)
    returning e.id, e.xid, e.at into id, xid, at;
    payload := format('{"id":%s,"table":%s,"op":"%s","xid":"%s","at":"%s","new":%s,"old":%s,'
                      '"new_session":%s,"old_session":%s}',
        id, to_json(table_name), op, xid,
        to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        coalesce(new_row::text, 'null'), coalesce(old_row::text, 'null'),
        coalesce(new_session::text, 'null'), coalesce(old_session::text, 'null'));
    if octet_length(payload) >= 8000 then
        payload := format('{"id":%s,"table":%s,"op":"%s","xid":"%s","at":"%s","fetch":true}',
            id, to_json(table_name), op, xid,
            to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
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
    -- The event being written: see relay.emit().
    op text;
    event_id bigint;
    event_xid xid8;
    event_at timestamptz;
    payload text;
begin
    if current_setting('relay.staged', true) = 'one' then
        -- One staged row: nothing to order or gather.
        delete from relay.pending p where p.xid = pg_current_xact_id() returning p.* into change;
        changes := array[change];
        consultations := change.table_name in ('consultation_sessions', 'consultation_messages');
    else
        -- `returning p` keeps the rows' own type; an array of the CTE's anonymous rows would be
        -- converted to relay.pending[] through text, every jsonb printed and parsed again.
        with taken as (
            delete from relay.pending p where p.xid = pg_current_xact_id() returning p
        )
        select coalesce(array_agg(t.p order by (t.p).seq), '{}'),
               coalesce(bool_or((t.p).table_name in ('consultation_sessions', 'consultation_messages')), false)
        into changes, consultations
        from taken t;
    end if;
    perform set_config('relay.published', 'on', true);
    if cardinality(changes) = 0 then
        return null;
    end if;

    -- Only the consultations' events read these.
    if consultations then
        sessions_now := '{}';
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

    -- From here to commit, no other transaction draws event ids (the commit-order lock of
    -- triggers/003_commit_order.sql). Nothing else is done under the lock but drawing them, writing
    -- the events and queueing their notifications, with the id spliced into each payload.
    perform pg_advisory_xact_lock(8243122779093852015);

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
        -- relay.emit(), written out; the hand-over below calls it. As a call here, it cost every
        -- commit 15,000 more instructions (bench/capture-instructions.sh).
        op := case when change.old_row is null then 'INSERT'
                   when change.new_row is null then 'DELETE' else 'UPDATE' end;
        insert into relay.events as e (table_name, op, new_row, old_row, new_session, old_session)
        values (change.table_name, op, change.new_row, change.old_row, new_session, old_session)
        returning e.id, e.xid, e.at into event_id, event_xid, event_at;
        -- One call of format() rather than a chain of ||: PL/pgSQL sets up each expression it
        -- evaluates once per transaction, and the chain's many nodes cost every commit 17,000
        -- more instructions (bench/capture-instructions.sh). Same text, byte for byte.
        payload := format('{"id":%s,"table":%s,"op":"%s","xid":"%s","at":"%s","new":%s,"old":%s,'
                          '"new_session":%s,"old_session":%s}',
            event_id, to_json(change.table_name), op, event_xid,
            to_char(event_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            coalesce(change.new_row::text, 'null'), coalesce(change.old_row::text, 'null'),
            coalesce(new_session::text, 'null'), coalesce(old_session::text, 'null'));
        if octet_length(payload) >= 8000 then
            payload := format('{"id":%s,"table":%s,"op":"%s","xid":"%s","at":"%s","fetch":true}',
                event_id, to_json(change.table_name), op, event_xid,
                to_char(event_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
        end if;
        perform pg_notify('relay_events', payload);

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
revoke all on function relay.capture_change() from public;
revoke all on function relay.capture_truncate() from public;
revoke all on function relay.publish() from public;
revoke all on function relay.emit(text, jsonb, jsonb, jsonb, jsonb) from public;
