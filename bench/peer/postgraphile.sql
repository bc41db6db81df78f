-- What the PostGraphile peer (postgraphile.js) needs in the run's database, applied before
-- Postgres' ceiling is measured, so the ceiling includes its cost. PostGraphile's simple
-- subscriptions send a client, for each notification on `postgraphile:<topic>` it listens to,
-- the node the notification names: read back with a query when the client asks for the node,
-- or only its id (the base64 of the node's identifiers) when it asks for `relatedNodeId`. Here
-- the node is the event itself, identified by its id and time (which the benchmark's accounting
-- needs, and which a node id therefore carries), named in a notification to the admins' topic
-- and to the topic of each user its row names.
create schema peer;

create view peer.events as
    select id, table_name, op::text as op, coalesce(new_row, old_row) as row, at
    from relay.events;
comment on view peer.events is E'@primaryKey id,at';

-- Who may listen to which topic, asked by PostGraphile (pg-pubsub's `subscriptionAuthorizationFunction`)
-- with the token's claims set, once per subscription: an admin to the admins' topic, anyone to
-- their own user's. It returns the topic that would end the subscription, one for all.
-- A setting a pooled connection held earlier reads as '', hence nullif: no `sub`, no user topic.
create function peer.may_listen(topic text) returns text
language sql stable as $$
    select 'postgraphile:revoked'
    where topic = 'postgraphile:user:' || nullif(current_setting('jwt.claims.sub', true), '')
       or (topic = 'postgraphile:admins' and current_setting('jwt.claims.role', true) = 'admin')
$$;
comment on function peer.may_listen(text) is E'@omit';

create function peer.notify() returns trigger
language plpgsql as $$
declare
    node text := json_build_object('__node__', json_build_array('events', new.id, new.at))::text;
    users text[] := array[new.new_row->>'patient_id', new.new_row->>'dentist_id',
                          new.old_row->>'patient_id', new.old_row->>'dentist_id'];
    u text;
begin
    perform pg_notify('postgraphile:admins', node);
    for u in select distinct x from unnest(users) as x where x is not null loop
        perform pg_notify('postgraphile:user:' || u, node);
    end loop;
    return null;
end
$$;

create trigger peer_notify after insert on relay.events
    for each row execute function peer.notify();
