-- 003_row_level_security.sql: who may read which rows. These policies are the source of truth;
-- the relay's authorization filter (relay/src/authz.rs) mirrors them rule for rule, and
-- docs/authorization.md sets each policy beside the relay rule that mirrors it.
--
-- Only SELECT policies: `authenticated` reads, it does not write. Policies are dropped and created
-- again so that this file can be read top to bottom as the complete set.

alter table public.profiles              enable row level security;
alter table public.appointments          enable row level security;
alter table public.availability          enable row level security;
alter table public.consultation_sessions enable row level security;
alter table public.consultation_messages enable row level security;

-- profiles: admins see everyone; everyone sees their own profile.
drop policy if exists profiles_admin on public.profiles;
create policy profiles_admin on public.profiles for select to authenticated
    using (auth.role() = 'admin');
drop policy if exists profiles_self on public.profiles;
create policy profiles_self on public.profiles for select to authenticated
    using (id = auth.uid());

-- appointments: admins and the chatbot see every row; dentists and patients their own.
-- The chatbot sees every row but not every column: see the view appointment_slots below.
drop policy if exists appointments_admin on public.appointments;
create policy appointments_admin on public.appointments for select to authenticated
    using (auth.role() = 'admin');
drop policy if exists appointments_dentist on public.appointments;
create policy appointments_dentist on public.appointments for select to authenticated
    using (auth.role() = 'dentist' and dentist_id = auth.uid());
drop policy if exists appointments_patient on public.appointments;
create policy appointments_patient on public.appointments for select to authenticated
    using (auth.role() = 'patient' and patient_id = auth.uid());
drop policy if exists appointments_chatbot on public.appointments;
create policy appointments_chatbot on public.appointments for select to authenticated
    using (auth.role() = 'chatbot');

-- availability: every signed-in role sees every slot.
drop policy if exists availability_read on public.availability;
create policy availability_read on public.availability for select to authenticated
    using (auth.role() in ('admin', 'dentist', 'patient', 'chatbot'));

-- consultation_sessions: admins see all; dentists and patients their own; the chatbot nothing.
drop policy if exists consultation_sessions_admin on public.consultation_sessions;
create policy consultation_sessions_admin on public.consultation_sessions for select to authenticated
    using (auth.role() = 'admin');
drop policy if exists consultation_sessions_dentist on public.consultation_sessions;
create policy consultation_sessions_dentist on public.consultation_sessions for select to authenticated
    using (auth.role() = 'dentist' and dentist_id = auth.uid());
drop policy if exists consultation_sessions_patient on public.consultation_sessions;
create policy consultation_sessions_patient on public.consultation_sessions for select to authenticated
    using (auth.role() = 'patient' and patient_id = auth.uid());

-- consultation_messages: admins see all; dentists and patients the messages of their own sessions
-- (visibility follows the session, so a session that changes hands changes who reads it).
drop policy if exists consultation_messages_admin on public.consultation_messages;
create policy consultation_messages_admin on public.consultation_messages for select to authenticated
    using (auth.role() = 'admin');
drop policy if exists consultation_messages_dentist on public.consultation_messages;
create policy consultation_messages_dentist on public.consultation_messages for select to authenticated
    using (auth.role() = 'dentist' and exists (
        select 1 from public.consultation_sessions s
        where s.id = session_id and s.dentist_id = auth.uid()));
drop policy if exists consultation_messages_patient on public.consultation_messages;
create policy consultation_messages_patient on public.consultation_messages for select to authenticated
    using (auth.role() = 'patient' and exists (
        select 1 from public.consultation_sessions s
        where s.id = session_id and s.patient_id = auth.uid()));

-- The chatbot's column limit. Row-level security chooses rows, never columns, and every user
-- shares the one database role `authenticated`, so column grants cannot tell the chatbot apart.
-- The chatbot's columns are therefore expressed as this view: the only appointment columns a
-- chatbot may read. The relay sends the chatbot exactly these columns (Projection::Slot in
-- relay/src/authz.rs); SQL clients acting for the chatbot read this view, not the table.
-- security_invoker makes the view apply the caller's policies, so it adds no rows to anyone.
create or replace view public.appointment_slots with (security_invoker = true) as
    select id, dentist_id, starts_at, ends_at, status, kind
    from public.appointments;
grant select on public.appointment_slots to authenticated;
