-- 001_event_log.sql: the event log. Every committed change to a watched row is one row here.
--
-- The log is what makes the feed durable: NOTIFY only wakes the relay and carries small rows
-- inline, but NOTIFY forgets everything sent while no one listens, and its payload must stay under
-- 8000 bytes. The log keeps every event whole, so the relay can read an event that is too large
-- for NOTIFY, and catch up on events it missed.
--
-- `xid` is the writing transaction's id. Event ids come from a sequence and transactions commit in
-- another order than they draw ids, so "every id above the last one read" skips events; the
-- transaction id lets a reader use transaction snapshots instead (pg_visible_in_snapshot), as PgQ
-- does. See docs/design.md.

create schema if not exists relay;

create table if not exists relay.events (
    id          bigserial primary key,
    table_name  text not null,
    op          text not null check (op in ('INSERT', 'UPDATE', 'DELETE')),
    -- The row after the change (INSERT, UPDATE) and before it (UPDATE, DELETE), as to_jsonb gives it.
    new_row     jsonb,
    old_row     jsonb,
    -- consultation_messages only: the participants of the message's session before the
    -- transaction (old_session) and at its commit (new_session), {"patient_id": ..., "dentist_id":
    -- ...}. A message's readers are its session's (see sql/003_row_level_security.sql), and the
    -- relay must not look the session up per event.
    new_session jsonb,
    old_session jsonb,
    xid         xid8 not null default pg_current_xact_id(),
    at          timestamptz not null default clock_timestamp()
);

create index if not exists events_xid_idx on relay.events (xid);
create index if not exists events_at_idx on relay.events (at);

comment on table relay.events is
    'One row per committed net change to a watched row; written only by relay.publish().';
