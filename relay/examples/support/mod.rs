//! What the examples share: a fresh, migrated database with one dentist and one patient, a relay
//! started in-process on it, and tokens for its users.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use relay::authz::{Principal, Role};
use relay::token::{Issuer, Secret};
use relay::{Config, Relay};

pub type Error = Box<dyn std::error::Error>;

pub struct Setup {
    /// A connection to the fresh database.
    pub db: Client,
    pub relay: Relay,
    pub dentist: Uuid,
    pub patient: Uuid,
    admin: Client,
    name: String,
    secret: Secret,
}

impl Setup {
    /// Creates database `<prefix>_<random>` on Postgres at 127.0.0.1:5432 (or
    /// `TEST_DATABASE_URL`), migrates it, adds a dentist and a patient, and starts a relay.
    pub async fn new(prefix: &str) -> Result<Setup, Error> {
        let base = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("{prefix}_{}", Uuid::new_v4().simple());
        let (admin, conn) = tokio_postgres::connect(&format!("{base}/postgres"), NoTls).await?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("create database {name}"))
            .await?;
        let url = format!("{base}/{name}");
        let (mut db, conn) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(conn);
        relay::migrate::migrate(&mut db).await?;

        let secret = Secret::new("example-secret-0123456789abcdef-0123456789")?;
        let mut config = Config::new(url.parse()?, secret.clone());
        config.bind = "127.0.0.1:0".parse()?;
        let relay = Relay::start(config).await?;
        relay.health().wait_for(true).await;

        let (dentist, patient) = (Uuid::new_v4(), Uuid::new_v4());
        db.execute(
            "insert into profiles (id, role) values ($1, 'dentist'), ($2, 'patient')",
            &[&dentist, &patient],
        )
        .await?;
        Ok(Setup {
            db,
            relay,
            dentist,
            patient,
            admin,
            name,
            secret,
        })
    }

    /// The WebSocket URL for the dentist, with a token valid for an hour.
    pub fn dentist_url(&self) -> String {
        let token = Issuer::new(&self.secret).issue(
            &Principal {
                user_id: self.dentist,
                role: Role::Dentist,
            },
            Duration::from_secs(3600),
        );
        format!("ws://{}/ws?access_token={token}", self.relay.local_addr())
    }

    /// Stops the relay and drops the database.
    pub async fn finish(self) -> Result<(), Error> {
        self.relay.shutdown().await;
        drop(self.db);
        self.admin
            .batch_execute(&format!("drop database {} with (force)", self.name))
            .await?;
        Ok(())
    }
}
