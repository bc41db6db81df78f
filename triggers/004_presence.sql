-- 004_presence.sql: who is connected to which consultation, across every relay instance on this
-- database, with the database as the bus (no other service).
--
-- Each relay instance registers when its LISTEN connection opens and gets an instance number. It
-- records which users its own sockets have joined to which sessions in relay.presence, and every
-- change it makes is announced on the channel `relay_presence`:
--
--   {"instance": 7, "session_id": "...", "user_id": "...", "role": "dentist", "present": true}
--   {"instance": 7, "gone": true}
--
-- Every instance LISTENs on the channel and keeps the union of all instances' rows: a user is
-- present in a session while at least one instance has them there.
--
-- Liveness. An instance holds a session-level advisory lock named after its number on its LISTEN
-- connection for as long as that connection lives. relay.presence_sweep(), which every instance
-- calls every few seconds, removes the rows of instances whose lock is free (their process or
-- connection is gone) and announces them gone. A relay that is killed therefore leaves no one
-- present for longer than one sweep interval.
--
-- Both tables are unlogged: presence is about connections, which a database restart ends anyway.

create unlogged table if not exists relay.presence_instances (
    instance      bigint primary key,
    registered_at timestamptz not null default now()
);
create sequence if not exists relay.presence_instance_seq;

create unlogged table if not exists relay.presence (
    instance   bigint not null references relay.presence_instances on delete cascade,
    session_id uuid not null,
    user_id    uuid not null,
    role       text not null,
    primary key (session_id, user_id, instance)
);
create index if not exists presence_instance_idx on relay.presence (instance);

comment on table relay.presence is
    'Users connected to consultation sessions, per relay instance; see triggers/004_presence.sql.';

-- The advisory lock that says an instance is alive (two-key space, apart from the event locks).
create or replace function relay.presence_lock_key(instance bigint) returns integer
language sql immutable
as $$ select (instance % 2147483647)::integer $$;

-- Registers the calling connection's relay as a new instance and returns its number. Call it on
-- the LISTEN connection: the instance lives as long as that connection does.
create or replace function relay.presence_register() returns bigint
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
declare
    number bigint := nextval('relay.presence_instance_seq');
begin
    perform pg_advisory_lock(1919249506, relay.presence_lock_key(number));
    insert into relay.presence_instances (instance) values (number);
    return number;
end
$$;

-- Applies an instance's changes, in order: [{"session_id", "user_id", "role", "present"}, ...].
-- Returns false (and changes nothing) when the instance is not registered, which happens only
-- when its LISTEN connection is gone; the relay then registers again and replaces its rows.
create or replace function relay.presence_apply(instance bigint, changes jsonb) returns boolean
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    change jsonb;
    done boolean;
begin
    perform 1 from relay.presence_instances i where i.instance = presence_apply.instance for share;
    if not found then
        return false;
    end if;
    for change in select * from jsonb_array_elements(changes) loop
        if (change ->> 'present')::boolean then
            insert into relay.presence (instance, session_id, user_id, role)
            values (presence_apply.instance, (change ->> 'session_id')::uuid,
                    (change ->> 'user_id')::uuid, change ->> 'role')
            on conflict do nothing;
        else
            delete from relay.presence p
            where p.instance = presence_apply.instance
              and p.session_id = (change ->> 'session_id')::uuid
              and p.user_id = (change ->> 'user_id')::uuid;
        end if;
        get diagnostics done = row_count;
        if done then
            perform pg_notify('relay_presence', jsonb_build_object(
                'instance', presence_apply.instance,
                'session_id', change -> 'session_id',
                'user_id', change -> 'user_id',
                'role', change -> 'role',
                'present', (change ->> 'present')::boolean)::text);
        end if;
    end loop;
    return true;
end
$$;

-- Removes an instance and everything it had, and announces it gone.
create or replace function relay.presence_forget(instance bigint) returns void
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    delete from relay.presence_instances i where i.instance = presence_forget.instance;
    if found then
        perform pg_notify('relay_presence',
            jsonb_build_object('instance', presence_forget.instance, 'gone', true)::text);
    end if;
end
$$;

-- Forgets every instance whose LISTEN connection is gone (its lock is free); returns how many.
create or replace function relay.presence_sweep() returns integer
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
declare
    number bigint;
    swept integer := 0;
begin
    for number in select instance from relay.presence_instances order by instance loop
        -- The lock would be granted to the connection that holds it: never sweep oneself.
        continue when exists (
            select 1 from pg_locks l
            where l.locktype = 'advisory' and l.pid = pg_backend_pid() and l.objsubid = 2
              and l.classid = 1919249506::oid
              and l.objid = relay.presence_lock_key(number)::oid);
        if pg_try_advisory_xact_lock(1919249506, relay.presence_lock_key(number)) then
            perform relay.presence_forget(number);
            swept := swept + 1;
        end if;
    end loop;
    return swept;
end
$$;

revoke all on function relay.presence_register() from public;
revoke all on function relay.presence_apply(bigint, jsonb) from public;
revoke all on function relay.presence_forget(bigint) from public;
revoke all on function relay.presence_sweep() from public;
