-- 012_cursor_key.sql: the key of cursors' tags.
--
-- A cursor names an event by its id and a tag, so that after the log went back (a restore, a
-- failover that lost commits) a cursor of an event the log no longer holds is refused even once
-- another event has taken its id. The tag is a keyed hash (SipHash-2-4) of the event's id and
-- time: with this key, kept where only the relay's role reads it, a tag tells a client nothing
-- about the time of an event it may not see, so a `subscribed` reply can carry the tag of the
-- relay's position.
-- Every relay on the database reads the same key, and a restore brings it back with the log.
-- Replacing it expires every tagged cursor clients hold: they refetch once.

create table if not exists relay.cursor_key (
    only_row boolean primary key default true check (only_row),
    key      bytea not null check (length(key) = 16)
);

-- gen_random_uuid() draws from the server's strong random source: 122 random bits.
insert into relay.cursor_key (key)
values (decode(replace(gen_random_uuid()::text, '-', ''), 'hex'))
on conflict do nothing;

revoke all on relay.cursor_key from public;

comment on table relay.cursor_key is
    'The key of the tags in event cursors (SipHash-2-4 of the event''s id and time); one row.';
