-- The tables bench/ceiling.sh and bench/capture-instructions.sh insert into, in a database
-- migrated with `relay migrate`: 1,000 dentists and 10,000 patients to book, and beside
-- `appointments` (which the relay's capture watches) two tables with the same columns, keys,
-- indexes, checks and foreign keys, where only the triggers differ: `plain` has none, `notified`
-- a minimal per-row NOTIFY trigger (the physical limit of any NOTIFY design).
insert into profiles (id, role)
select ('00000000-0000-4000-8000-' || lpad(g::text, 12, '0'))::uuid,
       case when g <= 1000 then 'dentist' else 'patient' end
from generate_series(1, 11000) g;
create table plain (like appointments including all);
create table notified (like appointments including all);
alter table plain add foreign key (patient_id) references profiles,
                  add foreign key (dentist_id) references profiles;
alter table notified add foreign key (patient_id) references profiles,
                     add foreign key (dentist_id) references profiles;
create function notify_row() returns trigger language plpgsql as $$
begin
    perform pg_notify('ceiling', row_to_json(new)::text);
    return null;
end $$;
create trigger notify_row after insert on notified for each row execute function notify_row();
