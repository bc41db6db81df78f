//! The relay's database connections besides the LISTEN one.
//!
//! Two pools: one for clients' work (subscribe-time checks, replays, history, sends), shared
//! fairly between users, and a small one for the relay's own (catching up on the log after a
//! reconnect, presence). No client's load can then hold back the live feed: a user who keeps
//! the clients' pool busy makes other users' requests wait, never the events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures::future::BoxFuture;
use tokio::sync::{Notify, Semaphore};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// How long the relay waits for a query, and for a pooled connection.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a query on a pooled connection may run on the server: a backstop for a query the
/// relay gave up on and whose cancel did not reach the server.
const STATEMENT_TIMEOUT: &str = "30s";

/// Connections of the relay's own pool: one for the listener, one for presence.
pub const INTERNAL_POOL_SIZE: usize = 2;

/// Abandoned queries being cancelled at once, in the whole process. Each holds two connections
/// to Postgres (its own, out of its pool, and the cancel's) for up to [`QUERY_TIMEOUT`]; beyond
/// this many, an abandoned query's connection is closed without a cancel (the server ends the
/// query at `statement_timeout` at the latest), so that the files they take stay bounded.
pub const MAX_CANCELS: usize = 16;

static CANCELS: Semaphore = Semaphore::const_new(MAX_CANCELS);

/// A pool of `size` connections. Its connections notice a vanished database host within about a
/// minute (keepalives while idle, `TCP_USER_TIMEOUT` while a query waits), rather than the
/// kernel's 15; waiting for one, opening one and checking one each give up after
/// [`QUERY_TIMEOUT`].
pub fn pool(
    database: &tokio_postgres::Config,
    size: usize,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let mut database = database.clone();
    database
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(60));
    let manager = Manager::from_config(
        database,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(QUERY_TIMEOUT))
        .create_timeout(Some(QUERY_TIMEOUT))
        .recycle_timeout(Some(QUERY_TIMEOUT))
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)
            })
        }))
        .build()
}

/// A pooled connection that goes back to the pool only when the work on it has finished
/// ([`Lease::finish`]). Dropped before that (its query timed out, or whoever waited for it went
/// away), its query is cancelled on the server and the connection closed: returned as it was,
/// it would still be busy with the abandoned query, and whoever got it next would wait behind
/// it and time out in turn. The user's share, if any, is held until the cancel is sent.
pub struct Lease {
    client: Option<Object>,
    share: Option<Share>,
}

impl Lease {
    /// The work on it is done: the connection goes back to the pool.
    pub fn finish(mut self) {
        self.client.take();
    }

    pub fn client(&mut self) -> &mut Object {
        self.client
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl std::ops::Deref for Lease {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.client
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let share = self.share.take();
        if client.is_closed() {
            // Nothing runs on a connection that is gone; the pool drops it.
            return;
        }
        let cancel = client.cancel_token();
        // Out of the pool at once; closed once the cancel is sent.
        let client = Object::take(client);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(place) = CANCELS.try_acquire() else {
            tracing::warn!(
                most = MAX_CANCELS,
                "too many abandoned queries being cancelled; this one's connection is closed \
                 without a cancel"
            );
            return;
        };
        runtime.spawn(async move {
            let _place = place;
            match tokio::time::timeout(QUERY_TIMEOUT, cancel.cancel_query(NoTls)).await {
                Ok(Ok(())) => {}
                Ok(Err(cause)) => tracing::warn!(cause = %crate::Causes(&cause),
                    "could not cancel an abandoned query; its connection is closed"),
                Err(_) => tracing::warn!(
                    "could not cancel an abandoned query in time; its connection is closed"
                ),
            }
            drop((client, share));
        });
    }
}

/// A connection from `pool`, for work that calls [`Lease::finish`] when done.
pub async fn lease(pool: &Pool) -> Result<Lease, PoolError> {
    Ok(Lease {
        client: Some(pool.get().await?),
        share: None,
    })
}

/// Runs `work` on `lease` for at most [`QUERY_TIMEOUT`]; the connection goes back to the pool
/// if it finished (well or not), and is abandoned if not.
pub async fn bounded<T, E>(
    mut lease: Lease,
    work: impl for<'a> FnOnce(&'a mut Object) -> BoxFuture<'a, Result<T, E>>,
) -> Result<Result<T, E>, tokio::time::error::Elapsed> {
    let outcome = tokio::time::timeout(QUERY_TIMEOUT, work(lease.client())).await;
    if outcome.is_ok() {
        lease.finish();
    }
    outcome
}

/// Why [`ClientPool::get`] gave no connection.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error(
        "this user's other requests held all {0} of the user's connections for {QUERY_TIMEOUT:?}"
    )]
    Busy(usize),
    #[error("no connection from the pool within {QUERY_TIMEOUT:?}")]
    Timeout,
    #[error("no connection from the pool: {}", crate::Causes(.0))]
    Pool(#[from] PoolError),
}

/// The clients' pool, shared between users: each may have at most its share of the
/// connections at work at once, so that one user's requests, however many, leave the rest of
/// the pool to the others.
#[derive(Clone)]
pub struct ClientPool {
    pub pool: Pool,
    shares: Arc<Shares>,
}

struct Shares {
    per_user: usize,
    busy: Mutex<HashMap<Uuid, usize>>,
    freed: Notify,
}

/// One unit of a user's share, held while the user's work has a connection; dropping it frees
/// it.
pub struct Share {
    shares: Arc<Shares>,
    user: Uuid,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut busy = self
            .shares
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = busy.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.user);
            }
        }
        drop(busy);
        self.shares.freed.notify_waiters();
    }
}

impl ClientPool {
    /// The pool, each user allowed half its connections at once (at least one).
    pub fn new(pool: Pool) -> ClientPool {
        let per_user = (pool.status().max_size / 2).max(1);
        ClientPool {
            pool,
            shares: Arc::new(Shares {
                per_user,
                busy: Mutex::default(),
                freed: Notify::new(),
            }),
        }
    }

    /// A share for `user`, if the user has one free.
    pub fn try_share(&self, user: Uuid) -> Option<Share> {
        let mut busy = self
            .shares
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = busy.entry(user).or_default();
        if *n >= self.shares.per_user {
            return None;
        }
        *n += 1;
        Some(Share {
            shares: self.shares.clone(),
            user,
        })
    }

    /// A share for `user`, waiting while the user's other work holds all of them.
    pub async fn share(&self, user: Uuid) -> Share {
        loop {
            // Registered before trying, so that a share freed in between is not missed.
            let freed = self.shares.freed.notified();
            if let Some(share) = self.try_share(user) {
                return share;
            }
            freed.await;
        }
    }

    /// A connection for `user`'s work, holding one of the user's shares until the work is done.
    /// It waits at most [`QUERY_TIMEOUT`] in all: for the share, then for the pool.
    pub async fn get(&self, user: Uuid) -> Result<Lease, GetError> {
        let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
        let share = tokio::time::timeout_at(deadline, self.share(user))
            .await
            .map_err(|_| GetError::Busy(self.shares.per_user))?;
        let client = tokio::time::timeout_at(deadline, self.pool.get())
            .await
            .map_err(|_| GetError::Timeout)??;
        Ok(Lease {
            client: Some(client),
            share: Some(share),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize) -> ClientPool {
        let database: tokio_postgres::Config = "host=127.0.0.1 user=nobody".parse().unwrap();
        ClientPool::new(super::pool(&database, size).unwrap())
    }

    #[tokio::test]
    async fn each_user_gets_half_the_pool_and_waits_for_their_own_work() {
        let pool = pool(8);
        assert_eq!(pool.shares.per_user, 4);
        assert_eq!(self::pool(1).shares.per_user, 1);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let held: Vec<Share> = (0..4).map(|_| pool.try_share(alice).unwrap()).collect();
        assert!(pool.try_share(alice).is_none());
        // Another user is not held back.
        let bobs = pool.try_share(bob).expect("bob's share");
        // Alice's fifth waits until one of hers is freed, not bob's.
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.share(alice).await }
        });
        drop(bobs);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "bob's freed share went to alice");
        let mut held = held;
        held.pop();
        let fifth = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("freed share reaches the waiter")
            .unwrap();
        assert!(pool.try_share(alice).is_none());
        drop(fifth);
        drop(held);
        // All freed: nothing is left in the bookkeeping.
        assert!(pool.shares.busy.lock().unwrap().is_empty());
    }
}
