-- 004_consultations.sql: writing to a consultation. Sending a message, starting and ending a
-- session, each through one function that checks its rules here, in the database, so the relay
-- and any other writer (an app backend, an RPC call, psql acting for a user) obey the same ones.
--
-- The caller is the signed-in user of the request, as row-level security sees them: auth.uid()
-- and auth.role() from `request.jwt.claims` (sql/002_auth.sql). For example:
--
--   begin;
--   select set_config('request.jwt.claims', '{"sub":"<uuid>","role":"patient"}', true);
--   select * from public.send_consultation_message('<session>', 'Hello', '<client uuid>');
--   commit;
--
-- Each broken rule raises its own SQLSTATE, which the relay turns into its error code:
--
--   RL404  not_found          the session does not exist
--   RL403  forbidden          the caller is not the session's patient or dentist (admins and the
--                             chatbot may not post or act as others), or has no signed-in identity
--   RL410  session_ended      the session has ended: no more messages, no restart
--   RL422  invalid_body       the body is empty or longer than 4000 characters after trimming
--   RL409  conflict           a client_id reused for another message, or a start or end that
--                             does not fit the session's status (start a session twice, end one
--                             that never started)
--
-- The functions are SECURITY DEFINER with a fixed search_path: callers need no write privileges on
-- the tables, only EXECUTE on these functions.

-- A message's client_id is chosen by the sending client, once per message, so that a retry after a
-- lost reply finds the message it already created instead of creating another.
alter table public.consultation_messages add column if not exists client_id uuid;
create unique index if not exists consultation_messages_sender_client_id_idx
    on public.consultation_messages (sender_id, client_id);
-- A session's history, newest first, page by page (read backwards).
create index if not exists consultation_messages_history_idx
    on public.consultation_messages (session_id, created_at, id);

-- A session's duration, derived: from its start to its end, NULL until it has both.
alter table public.consultation_sessions
    add column if not exists duration interval generated always as (ended_at - started_at) stored;

-- Sends a message as the caller. Idempotent by (caller, client_id): calling again with the same
-- session, body and client_id returns the message the first call created, whatever happened to the
-- session since.
create or replace function public.send_consultation_message(
    session_id uuid, body text, client_id uuid)
returns public.consultation_messages
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    caller uuid := auth.uid();
    caller_role text := auth.role();
    -- Whitespace as Unicode (and JavaScript's trim) counts it, whatever the database's locale.
    trimmed text := regexp_replace(send_consultation_message.body,
        '^[\s\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+|'
        '[\s\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+$', '', 'g');
    target public.consultation_sessions;
    message public.consultation_messages;
begin
    if caller is null or caller_role is null then
        raise exception 'no signed-in user: request.jwt.claims names no sub and role'
            using errcode = 'RL403';
    end if;
    if send_consultation_message.client_id is null then
        raise exception 'client_id is required: a uuid the client chooses once per message'
            using errcode = 'RL409';
    end if;
    -- A retry of a message already sent gets that message.
    select m.* into message from public.consultation_messages m
    where m.sender_id = caller and m.client_id = send_consultation_message.client_id;
    if found then
        if message.session_id <> send_consultation_message.session_id
           or message.body is distinct from trimmed then
            raise exception 'client_id % was already used for another message', message.client_id
                using errcode = 'RL409';
        end if;
        return message;
    end if;

    -- FOR SHARE: a concurrent end of the session commits wholly before or after this message.
    select s.* into target from public.consultation_sessions s
    where s.id = send_consultation_message.session_id
    for share;
    if not found then
        raise exception 'session % does not exist', send_consultation_message.session_id
            using errcode = 'RL404';
    end if;
    if not ((caller_role = 'patient' and target.patient_id = caller)
            or (caller_role = 'dentist' and target.dentist_id = caller)) then
        raise exception 'only the session''s patient and dentist may send to it'
            using errcode = 'RL403';
    end if;
    if target.status = 'ended' then
        raise exception 'session % has ended', target.id using errcode = 'RL410';
    end if;
    if trimmed is null or char_length(trimmed) = 0 or char_length(trimmed) > 4000 then
        raise exception 'a message body is 1 to 4000 characters after trimming (got %)',
            coalesce(char_length(trimmed), 0)
            using errcode = 'RL422';
    end if;

    insert into public.consultation_messages (session_id, sender_id, body, client_id)
    values (target.id, caller, trimmed, send_consultation_message.client_id)
    on conflict (sender_id, client_id) do nothing
    returning * into message;
    if message.id is null then
        -- A concurrent call with the same client_id committed first: answer as its retry.
        return public.send_consultation_message(
            send_consultation_message.session_id, send_consultation_message.body,
            send_consultation_message.client_id);
    end if;
    return message;
end
$$;

-- The session a start or an end acts on, once the caller is sure to be its dentist.
create or replace function public.own_consultation_for_update(session_id uuid)
returns public.consultation_sessions
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
declare
    target public.consultation_sessions;
begin
    select s.* into target from public.consultation_sessions s
    where s.id = own_consultation_for_update.session_id
    for update;
    if not found then
        raise exception 'session % does not exist', own_consultation_for_update.session_id
            using errcode = 'RL404';
    end if;
    if auth.role() is distinct from 'dentist' or target.dentist_id is distinct from auth.uid() then
        raise exception 'only the session''s dentist may start or end it' using errcode = 'RL403';
    end if;
    return target;
end
$$;

-- Starts a waiting session: status `active`, `started_at` now. The session's dentist only.
create or replace function public.start_consultation(session_id uuid)
returns public.consultation_sessions
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    target public.consultation_sessions := public.own_consultation_for_update(session_id);
begin
    if target.status = 'ended' then
        raise exception 'session % has ended', target.id using errcode = 'RL410';
    end if;
    if target.status <> 'waiting' then
        raise exception 'session % is already %', target.id, target.status
            using errcode = 'RL409';
    end if;
    update public.consultation_sessions s
    set status = 'active', started_at = now()
    where s.id = target.id
    returning s.* into target;
    return target;
end
$$;

-- Ends an active session: status `ended`, `ended_at` now, and the dentist's notes when given
-- (NULL keeps the notes the session has). The session's dentist only.
create or replace function public.end_consultation(session_id uuid, notes text default null)
returns public.consultation_sessions
language plpgsql volatile security definer set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    target public.consultation_sessions := public.own_consultation_for_update(session_id);
begin
    if target.status = 'ended' then
        raise exception 'session % has already ended', target.id using errcode = 'RL410';
    end if;
    if target.status <> 'active' then
        raise exception 'session % has not started', target.id using errcode = 'RL409';
    end if;
    update public.consultation_sessions s
    set status = 'ended', ended_at = now(), notes = coalesce(end_consultation.notes, s.notes)
    where s.id = target.id
    returning s.* into target;
    return target;
end
$$;

revoke all on function public.send_consultation_message(uuid, text, uuid) from public;
revoke all on function public.own_consultation_for_update(uuid) from public;
revoke all on function public.start_consultation(uuid) from public;
revoke all on function public.end_consultation(uuid, text) from public;
grant execute on function public.send_consultation_message(uuid, text, uuid) to authenticated;
grant execute on function public.start_consultation(uuid) to authenticated;
grant execute on function public.end_consultation(uuid, text) to authenticated;
