-- 002_auth.sql: the `authenticated` role and the auth.uid() / auth.role() helpers.
--
-- Written the way Supabase projects write them, so policies carry over unchanged: a request runs as
-- the NOLOGIN role `authenticated` with the caller's verified JWT claims in the setting
-- `request.jwt.claims`, e.g.
--
--   begin;
--   set local role authenticated;
--   select set_config('request.jwt.claims', '{"sub":"<uuid>","role":"dentist"}', true);
--   select * from appointments;   -- only what that dentist may see
--   commit;
--
-- Roles are cluster-wide while this file runs per database, so creating the role tolerates an
-- existing one (including one created concurrently by a migration of another database).

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin;
    end if;
exception when duplicate_object or unique_violation then
    null; -- created concurrently by another database's migration
end
$$;

create schema if not exists auth;
grant usage on schema auth to authenticated;

-- The caller's user id: the `sub` claim, or NULL when there is none or it is not a uuid.
create or replace function auth.uid() returns uuid
language sql stable
as $$
    select case when sub ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                then sub::uuid end
    from (select nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub' as sub) c
$$;

-- The caller's application role: the `role` claim (admin, dentist, patient or chatbot), or NULL.
create or replace function auth.role() returns text
language sql stable
as $$
    select nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
$$;

grant select on public.profiles, public.appointments, public.availability,
                public.consultation_sessions, public.consultation_messages
    to authenticated;
