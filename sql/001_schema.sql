-- 001_schema.sql: the clinic's tables.
--
-- Every column beyond the ones a booking needs has a default, so an insert that names only the
-- required columns works. Status and kind values are checked here, in the database, so every
-- writer (the app, psql, a migration) obeys the same rules.

create table if not exists public.profiles (
    id         uuid primary key,
    role       text not null check (role in ('admin', 'dentist', 'patient', 'chatbot')),
    full_name  text,
    created_at timestamptz not null default now()
);

create table if not exists public.appointments (
    id         uuid primary key default gen_random_uuid(),
    patient_id uuid not null references public.profiles,
    dentist_id uuid not null references public.profiles,
    starts_at  timestamptz not null,
    ends_at    timestamptz not null,
    status     text not null default 'booked'
               check (status in ('booked', 'confirmed', 'cancelled', 'completed')),
    kind       text not null default 'in_person'
               check (kind in ('in_person', 'video', 'audio', 'chat')),
    notes      text,
    created_at timestamptz not null default now(),
    check (ends_at > starts_at)
);
create index if not exists appointments_dentist_id_idx on public.appointments (dentist_id, starts_at);
create index if not exists appointments_patient_id_idx on public.appointments (patient_id, starts_at);

create table if not exists public.availability (
    id           uuid primary key default gen_random_uuid(),
    dentist_id   uuid not null references public.profiles,
    starts_at    timestamptz not null,
    ends_at      timestamptz not null,
    is_available boolean not null default true,
    created_at   timestamptz not null default now(),
    check (ends_at > starts_at)
);
create index if not exists availability_dentist_id_idx on public.availability (dentist_id, starts_at);

create table if not exists public.consultation_sessions (
    id             uuid primary key default gen_random_uuid(),
    appointment_id uuid references public.appointments,
    patient_id     uuid not null references public.profiles,
    dentist_id     uuid not null references public.profiles,
    status         text not null default 'waiting' check (status in ('waiting', 'active', 'ended')),
    started_at     timestamptz,
    ended_at       timestamptz,
    notes          text,
    created_at     timestamptz not null default now()
);
create index if not exists consultation_sessions_dentist_id_idx on public.consultation_sessions (dentist_id);
create index if not exists consultation_sessions_patient_id_idx on public.consultation_sessions (patient_id);

create table if not exists public.consultation_messages (
    id         uuid primary key default gen_random_uuid(),
    session_id uuid not null references public.consultation_sessions,
    sender_id  uuid not null references public.profiles,
    body       text not null,
    created_at timestamptz not null default now()
);
create index if not exists consultation_messages_session_id_idx
    on public.consultation_messages (session_id, created_at);
