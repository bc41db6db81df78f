//! Applying `sql/` and `triggers/` to a database.
//!
//! The relay embeds the very files a DBA can read and apply by hand, in order. Each applied file is
//! recorded in `relay.schema_migrations` with its checksum, so a second run changes nothing, and a
//! file edited after it was applied is reported instead of silently skipped or re-run. The whole
//! run is one transaction under an advisory lock: concurrent `relay migrate` runs (two instances
//! starting together) apply each file once, and a failing file leaves nothing half-applied.

use tokio_postgres::Client;

/// One SQL file, by its path in the repository.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($path:literal) => {
        Migration {
            name: $path,
            sql: include_str!(concat!("../../", $path)),
        }
    };
}

/// Every file of `sql/` then `triggers/`, in the order they are applied. A test checks that this
/// list and the directories agree.
pub const MIGRATIONS: &[Migration] = &[
    migration!("sql/001_schema.sql"),
    migration!("sql/002_auth.sql"),
    migration!("sql/003_row_level_security.sql"),
    migration!("sql/004_consultations.sql"),
    migration!("sql/005_cheaper_checks.sql"),
    migration!("sql/006_uniform_refusals.sql"),
    migration!("sql/007_deleted_messages.sql"),
    migration!("triggers/001_event_log.sql"),
    migration!("triggers/002_capture.sql"),
    migration!("triggers/003_commit_order.sql"),
    migration!("triggers/004_presence.sql"),
    migration!("triggers/005_publish_cost.sql"),
    migration!("triggers/006_lean_capture.sql"),
    migration!("triggers/007_fewer_calls.sql"),
    migration!("triggers/008_single_change.sql"),
    migration!("triggers/009_truncate.sql"),
    migration!("triggers/010_hand_over_isolation.sql"),
    migration!("triggers/011_pruned_event_time.sql"),
    migration!("triggers/012_cursor_key.sql"),
];

/// Arbitrary key of the advisory lock that serializes migrations.
const LOCK_KEY: i64 = 0x7265_6c61_795f_6d67; // "relay_mg"

const BOOTSTRAP: &str = "
    create schema if not exists relay;
    create table if not exists relay.schema_migrations (
        name       text primary key,
        checksum   text not null,
        applied_at timestamptz not null default now()
    );";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "{name} was changed after it was applied (checksum {applied} then, {now} now); \
             migrations are append-only: put the change in a new numbered file"
    )]
    Changed {
        name: &'static str,
        applied: String,
        now: String,
    },
    #[error("applying {name}: {}", crate::Causes(.source))]
    Apply {
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration bookkeeping: {}", crate::Causes(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// Applies every migration not yet applied; returns the names applied by this run.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>, MigrateError> {
    let tx = client.transaction().await?;
    tx.batch_execute("set local client_min_messages = warning")
        .await?;
    tx.execute("select pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(BOOTSTRAP).await?;
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let row = tx
            .query_one(
                "select md5($2::text), (select checksum from relay.schema_migrations where name = $1)",
                &[&migration.name, &migration.sql],
            )
            .await?;
        let now: String = row.get(0);
        match row.get::<_, Option<String>>(1) {
            Some(previous) if previous == now => continue,
            Some(previous) => {
                return Err(MigrateError::Changed {
                    name: migration.name,
                    applied: previous,
                    now,
                })
            }
            None => {}
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(|source| MigrateError::Apply {
                name: migration.name,
                source,
            })?;
        tx.execute(
            "insert into relay.schema_migrations (name, checksum) values ($1, $2)",
            &[&migration.name, &now],
        )
        .await?;
        applied.push(migration.name);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_sql_file_is_a_migration_in_order() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut on_disk = Vec::new();
        for dir in ["sql", "triggers"] {
            let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".sql"))
                .map(|n| format!("{dir}/{n}"))
                .collect();
            names.sort();
            on_disk.extend(names);
        }
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(listed, on_disk);
    }
}
