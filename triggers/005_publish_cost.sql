-- 005_publish_cost.sql: the same capture, with less work in Postgres per commit.
--
-- Every notifying commit runs relay.publish(), so its cost is paid on every write and, with the
-- commit-order lock held, partly in series. Two changes, measured together with
-- bench/capture-cpu.sh (BENCHMARKS.md, "A lighter publish"), take about 15 % off the CPU a
-- single-row commit costs its backend:
--
-- * relay.lock_commit_order() and relay.lock_sessions() become PL/pgSQL. As SQL functions with a
--   SET clause they could not be inlined, and Postgres parsed and planned their body again on every
--   call; PL/pgSQL keeps the plan for the session.
-- * relay.publish() looks up sessions' participants only when the transaction changed a
--   consultation session or message. Before, every transaction ran those queries over its changes
--   and found nothing.
--
-- What publish() does, and in what order, is otherwise unchanged (triggers/002_capture.sql and
-- 003_commit_order.sql explain it).

create or replace function relay.lock_commit_order() returns void
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_advisory_xact_lock(8243122779093852015);
end
$$;

create or replace function relay.lock_sessions(shared uuid[], exclusive uuid[]) returns void
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform case when bool_or(l.is_exclusive)
                 then pg_advisory_xact_lock(1919249505, l.key)::text
                 else pg_advisory_xact_lock_shared(1919249505, l.key)::text end
    from (
        select hashtext(id::text) as key, false as is_exclusive from unnest(shared) id
        union all
        select hashtext(id::text), true from unnest(exclusive) id
    ) l
    group by l.key
    order by l.key;
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
    delete from relay.pending_tx where xid = pg_current_xact_id();
    with taken as (
        delete from relay.pending p where p.xid = pg_current_xact_id() returning p.*
    )
    select coalesce(array_agg(t order by t.seq), '{}'),
           coalesce(bool_or(t.table_name in ('consultation_sessions', 'consultation_messages')), false)
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

    -- From here to commit, no other transaction draws event ids.
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

revoke all on function relay.lock_commit_order() from public;
revoke all on function relay.lock_sessions(uuid[], uuid[]) from public;
revoke all on function relay.publish() from public;
