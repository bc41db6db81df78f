-- 005_check_functions.sql: the same rules for the status and kind columns, written as calls of
-- functions, which costs each write a fraction of what the inline lists cost.
--
-- Postgres 15 keeps a table's CHECK constraints as stored expression trees in text form. Every
-- statement that inserts or updates rows reads that text back and prepares the expressions again.
-- For `status in ('booked', 'confirmed', ...)` the array constant makes that dear. Counted with
-- callgrind (bench/capture-instructions.sh; BENCHMARKS.md, "Checks as function calls"), the two
-- lists on appointments cost every single-row insert about 80,000 instructions, an eighth of a
-- commit through the relay's capture. A CHECK that calls a function is read back as one call. The
-- list lives in the function body, which each session prepares once. Calling it costs about 17,000
-- instructions per row, so a single-row insert saves about 45,000.
--
-- Same constraint names, same rules, same errors: SQLSTATE 23514 and 'new row for relation
-- "appointments" violates check constraint "appointments_status_check"'. Domains would have been
-- cheaper still, but a statement parameter bound to a domain column takes the domain's type, and
-- typed drivers (tokio-postgres among them) refuse to send a string as a domain they do not know.
-- The column types stay text.
--
-- The functions run with the writer's search_path. So they name pg_catalog's operator and type
-- explicitly: a writer who sets search_path to a schema of their own cannot swap in an `=` that
-- lets any value through. Replacing each constraint checks the existing rows once (a scan of the
-- table, no rewrite) while the migration holds the table's lock.

create or replace function public.is_appointment_status(value text) returns boolean
language plpgsql immutable parallel safe
as $$
begin
    return value operator(pg_catalog.=) any ('{booked,confirmed,cancelled,completed}'::pg_catalog.text[]);
end
$$;

create or replace function public.is_appointment_kind(value text) returns boolean
language plpgsql immutable parallel safe
as $$
begin
    return value operator(pg_catalog.=) any ('{in_person,video,audio,chat}'::pg_catalog.text[]);
end
$$;

create or replace function public.is_session_status(value text) returns boolean
language plpgsql immutable parallel safe
as $$
begin
    return value operator(pg_catalog.=) any ('{waiting,active,ended}'::pg_catalog.text[]);
end
$$;

comment on function public.is_appointment_status(text) is
    'The CHECK of appointments.status: booked, confirmed, cancelled or completed.';
comment on function public.is_appointment_kind(text) is
    'The CHECK of appointments.kind: in_person, video, audio or chat.';
comment on function public.is_session_status(text) is
    'The CHECK of consultation_sessions.status: waiting, active or ended.';

alter table public.appointments
    drop constraint appointments_status_check,
    add constraint appointments_status_check check (public.is_appointment_status(status)),
    drop constraint appointments_kind_check,
    add constraint appointments_kind_check check (public.is_appointment_kind(kind));

alter table public.consultation_sessions
    drop constraint consultation_sessions_status_check,
    add constraint consultation_sessions_status_check check (public.is_session_status(status));
