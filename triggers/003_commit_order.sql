-- 003_commit_order.sql: event ids in commit order, and a retention horizon for the event log.
--
-- Event ids come from a sequence, and a sequence hands out numbers in the order transactions ask,
-- not in the order they commit: if T1 draws 100 and T2 draws 101 and commits first, a reader that
-- has seen 101 and moves on never reads 100. (Postgres' own note on this, and PgQ's answer with
-- transaction snapshots, are summarised in docs/design.md.)
--
-- Here the ids themselves are made to follow commit order. relay.publish() runs at commit; just
-- before it draws its first event id it takes one transaction-level advisory lock, and holds it
-- until its transaction has committed (Postgres releases transaction locks after the commit is
-- visible). A transaction that draws ids after another must wait for that one to finish, so:
--
--   * every event with a smaller id than a committed event is itself committed, or was rolled
--     back and will never exist (ids may have holes, never late arrivals);
--   * `id > cursor` is therefore exact: a reader that has everything up to id N needs only the
--     events above N, whichever connection or relay instance asks, and whenever;
--   * NOTIFY, which delivers in commit order, delivers in id order.
--
-- The lock is held only from the first event id to the commit: an idle or long transaction holds
-- nothing until it commits. (Except after `SET CONSTRAINTS ALL IMMEDIATE`, which runs publish early:
-- the lock is then held until the transaction ends. See docs/design.md.) Notifying commits are already serialised by Postgres (one cluster-wide
-- lock from PreCommit_Notify to the end of commit); this lock extends that section to the writing
-- of the transaction's events. What it costs is measured in BENCHMARKS.md.
--
-- The participants of messages' sessions are read before the lock, so no row lock is waited for
-- while it is held (under REPEATABLE READ that read takes FOR SHARE).

-- Arbitrary key of the commit-order lock ("relay_co"); single-key advisory locks do not share a
-- key space with the two-key per-session locks of relay.lock_sessions().
create or replace function relay.lock_commit_order() returns void
language sql volatile security definer set search_path = pg_catalog, pg_temp
as $$ select pg_advisory_xact_lock(8243122779093852015) $$;

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

    sessions_now := '{}';
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
revoke all on function relay.publish() from public;

-- Retention. Events older than the relay's retention are deleted by relay.prune_events(), oldest
-- id first; `pruned_through` is the highest id deleted so far. A cursor below it may have lost
-- events and is refused (cursor_expired); a cursor at or above it is complete.
create table if not exists relay.log_horizon (
    only_row       boolean primary key default true check (only_row),
    pruned_through bigint not null default 0
);
insert into relay.log_horizon default values on conflict do nothing;

comment on table relay.log_horizon is
    'The highest event id deleted by retention; cursors below it are expired.';

-- Deletes up to `batch` of the oldest events recorded before `cutoff`, and every event with a
-- smaller id; returns how many it deleted. Called repeatedly by the relay until it returns 0.
-- Deleting by id prefix keeps the log gapless above the horizon whatever the `at` order.
create or replace function relay.prune_events(cutoff timestamptz, batch integer) returns bigint
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
declare
    upto bigint;
    deleted bigint;
begin
    select max(e.id) into upto
    from (select id, at from relay.events order by id limit batch) e
    where e.at < cutoff;
    if upto is null then
        return 0;
    end if;
    delete from relay.events where id <= upto;
    get diagnostics deleted = row_count;
    update relay.log_horizon set pruned_through = greatest(pruned_through, upto);
    return deleted;
end
$$;

revoke all on function relay.prune_events(timestamptz, integer) from public;
