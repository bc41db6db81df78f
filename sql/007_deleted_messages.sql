-- A message deleted outside the relay (by SQL: moderation, a user's request) stays deleted. A
-- client retries a send with the same client_id until it sees a reply, possibly after the delete:
-- that retry used to find nothing under its client_id and write the message again. Each deleted
-- message now leaves its sender and client_id behind, and a send naming them is refused with
-- RL409 (`conflict`), as a client_id used for another message is.
--
-- The marks hold no body and no session, and go with their sender's profile. No role the app
-- signs in as may read them: they are read only by send_consultation_message, which runs as its
-- owner. TRUNCATE fires no delete trigger and leaves no marks.

create table if not exists public.deleted_consultation_messages (
    sender_id  uuid not null references public.profiles on delete cascade,
    client_id  uuid not null,
    deleted_at timestamptz not null default now(),
    primary key (sender_id, client_id)
);
-- Row-level security with no policy, and no privilege, for the roles the app signs in as: a
-- database whose default privileges grant new tables to `authenticated` (as Supabase's do) would
-- otherwise let a user TRUNCATE the marks, which row-level security does not stop.
alter table public.deleted_consultation_messages enable row level security;
revoke all on public.deleted_consultation_messages from public, authenticated;

-- Once per statement: a session's messages deleted in one statement cost one insert.
create or replace function public.mark_deleted_consultation_messages()
returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    insert into public.deleted_consultation_messages (sender_id, client_id)
    select gone.sender_id, gone.client_id from gone where gone.client_id is not null
    on conflict do nothing;
    return null;
end
$$;
revoke all on function public.mark_deleted_consultation_messages() from public;

drop trigger if exists consultation_messages_mark_deleted on public.consultation_messages;
create trigger consultation_messages_mark_deleted
    after delete on public.consultation_messages
    referencing old table as gone
    for each statement execute function public.mark_deleted_consultation_messages();

-- Refuses a send whose client_id names a message of this sender deleted since. Called by
-- send_consultation_message, as its owner.
create or replace function public.refuse_deleted_consultation_message(sender_id uuid, client_id uuid)
returns void
language plpgsql set search_path = pg_catalog, pg_temp
as $$
begin
    if exists (select from public.deleted_consultation_messages d
               where d.sender_id = refuse_deleted_consultation_message.sender_id
                 and d.client_id = refuse_deleted_consultation_message.client_id) then
        raise exception 'client_id % was used for a message that has since been deleted; it is not sent again',
            refuse_deleted_consultation_message.client_id
            using errcode = 'RL409';
    end if;
end
$$;
revoke all on function public.refuse_deleted_consultation_message(uuid, uuid) from public;

-- As in 006_uniform_refusals.sql, with the deleted message's client_id refused: before the
-- insert, and again after it.
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
    -- A retry of a message deleted since is not sent again. The delete and its mark commit
    -- together: a retry that starts after both sees the mark here.
    perform public.refuse_deleted_consultation_message(caller, send_consultation_message.client_id);

    -- Only the caller's own session is read, and locked. FOR SHARE: a concurrent end or
    -- hand-over of the session commits wholly before or after this message (after waiting for
    -- one, the row is checked again as it now stands).
    select s.* into target from public.consultation_sessions s
    where s.id = send_consultation_message.session_id
      and ((caller_role = 'patient' and s.patient_id = caller)
           or (caller_role = 'dentist' and s.dentist_id = caller))
    for share;
    if not found then
        raise exception 'session % is not one of yours: only its patient and dentist may send to it',
            send_consultation_message.session_id
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
    -- A retry that ran beside the first send, found nothing above, and inserted only once that
    -- send's message had been deleted (the insert waits for the delete, and passes the deleted
    -- row): the delete's mark has committed by now, and this statement sees it. The error
    -- undoes the insert.
    perform public.refuse_deleted_consultation_message(caller, send_consultation_message.client_id);
    return message;
end
$$;
