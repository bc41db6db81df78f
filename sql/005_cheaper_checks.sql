-- 005_cheaper_checks.sql: the same rules for the status and kind columns, kept in domains that
-- the table's CHECK constraints cast to, which costs each write statement a fraction of what the
-- inline lists cost.
--
-- Postgres 15 keeps a table's CHECK constraints as stored expression trees in text form. Every
-- statement that inserts or updates rows reads that text back and prepares the expressions again.
-- For `status in ('booked', 'confirmed', ...)` the array constant makes that dear. Counted with
-- callgrind (bench/capture-instructions.sh; BENCHMARKS.md, "Checks kept in domains"), the two
-- lists on appointments cost every single-row insert about 80,000 instructions, an eighth of a
-- commit through the relay's capture. A domain's constraints are read once per session and kept.
-- So each list now lives in a domain, and the table's CHECK only casts the column to it:
-- `(status::appointment_status) is not null`, which is cheap to read back. A single-row insert
-- into appointments costs about 55,000 instructions less. Checking each row costs what it did,
-- so large statements gain nothing and lose nothing.
--
-- The columns stay `text`. Declaring them as the domains would have been cheaper still, but a
-- statement parameter bound to a domain column takes the domain's type, and typed drivers
-- (tokio-postgres among them) refuse to send a string as a type they do not know.
--
-- The rules and the SQLSTATE (23514, check_violation) are unchanged, and so is the constraint
-- name a refusal reports (appointments_status_check and so on): each domain's constraint carries
-- the name of the table constraint it replaces. The message now names the domain: 'value for
-- domain appointment_status violates check constraint "appointments_status_check"'. Constraints
-- and casts are stored by object id, so a writer's search_path cannot change what they check.
-- Replacing each constraint checks the existing rows once (a scan of the table, no rewrite)
-- while the migration holds the table's lock.

create domain public.appointment_status as text
    constraint appointments_status_check
    check (value in ('booked', 'confirmed', 'cancelled', 'completed'));
create domain public.appointment_kind as text
    constraint appointments_kind_check
    check (value in ('in_person', 'video', 'audio', 'chat'));
create domain public.consultation_status as text
    constraint consultation_sessions_status_check
    check (value in ('waiting', 'active', 'ended'));

comment on domain public.appointment_status is 'The values of appointments.status.';
comment on domain public.appointment_kind is 'The values of appointments.kind.';
comment on domain public.consultation_status is 'The values of consultation_sessions.status.';

alter table public.appointments
    drop constraint appointments_status_check,
    add constraint appointments_status_check check ((status::public.appointment_status) is not null),
    drop constraint appointments_kind_check,
    add constraint appointments_kind_check check ((kind::public.appointment_kind) is not null);

alter table public.consultation_sessions
    drop constraint consultation_sessions_status_check,
    add constraint consultation_sessions_status_check
        check ((status::public.consultation_status) is not null);
