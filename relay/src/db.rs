//! The relay's database connections besides the LISTEN one.
//!
//! Two pools: one for clients' work (subscribe-time checks, replays, history, sends), shared
//! fairly between users, and a small one for the relay's own (catching up on the log after a
//! reconnect, presence). No client's load can then hold back the live feed: a user who keeps
//! the clients' pool busy makes other users' requests wait, never the events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures::future::BoxFuture;
use tokio::sync::{oneshot, Semaphore};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// How long the relay waits for a query, and for a pooled connection, by default
/// (`RELAY_QUERY_TIMEOUT` for clients' requests); and for a cancel to be sent.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a query on a pooled connection may run on the server, in multiples of the pool's
/// timeout: a backstop for a query the relay gave up on and whose cancel did not reach the
/// server (30 s for the default timeout).
const STATEMENT_TIMEOUT_FACTOR: u32 = 6;

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
/// kernel's 15; waiting for one, opening one and checking one each give up after `timeout`, and
/// so does work on one run by [`bounded`].
pub fn pool(
    database: &tokio_postgres::Config,
    size: usize,
    timeout: Duration,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let statement_timeout = (timeout * STATEMENT_TIMEOUT_FACTOR).as_millis();
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
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            Box::pin(async move {
                client
                    .batch_execute(&format!("SET statement_timeout = {statement_timeout}"))
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
    /// How long work on it may take: its pool's timeout.
    timeout: Duration,
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

/// The timeout `pool` was built with.
fn timeout_of(pool: &Pool) -> Duration {
    pool.timeouts().wait.unwrap_or(QUERY_TIMEOUT)
}

/// The `statement_timeout` of `pool`'s connections.
pub fn statement_timeout_of(pool: &Pool) -> Duration {
    timeout_of(pool) * STATEMENT_TIMEOUT_FACTOR
}

/// A connection from `pool`, for work that calls [`Lease::finish`] when done.
pub async fn lease(pool: &Pool) -> Result<Lease, PoolError> {
    Ok(Lease {
        client: Some(pool.get().await?),
        share: None,
        timeout: timeout_of(pool),
    })
}

/// Runs `work` on `lease` for at most its pool's timeout; the connection goes back to the pool
/// if it finished (well or not), and is abandoned if not.
pub async fn bounded<T, E>(
    mut lease: Lease,
    work: impl for<'a> FnOnce(&'a mut Object) -> BoxFuture<'a, Result<T, E>>,
) -> Result<Result<T, E>, tokio::time::error::Elapsed> {
    let outcome = tokio::time::timeout(lease.timeout, work(lease.client())).await;
    if outcome.is_ok() {
        lease.finish();
    }
    outcome
}

/// Why [`ClientPool::get`] gave no connection.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("this user's other requests held all {0} of the user's connections for {1:?}")]
    Busy(usize, Duration),
    #[error("no connection from the pool within {0:?}")]
    Timeout(Duration),
    #[error("no connection from the pool: {}", crate::Causes(.0))]
    Pool(#[from] PoolError),
}

/// The clients' pool, shared between users: each may have at most its share of the
/// connections at work at once, so that one user's requests, however many, leave the rest of
/// the pool to the others; and a connection that comes free goes to the waiting user who holds
/// the fewest, so that users who keep the whole pool busy between them still take turns with
/// everyone else.
#[derive(Clone)]
pub struct ClientPool {
    pub pool: Pool,
    shares: Arc<Shares>,
}

struct Shares {
    per_user: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Connections of the pool no user's work holds.
    free: usize,
    /// How many each user's work holds.
    busy: HashMap<Uuid, usize>,
    /// Requests waiting for a connection, oldest first.
    waiting: VecDeque<Waiter>,
}

struct Waiter {
    user: Uuid,
    wake: oneshot::Sender<Share>,
}

impl State {
    fn held_by(&self, user: Uuid) -> usize {
        self.busy.get(&user).copied().unwrap_or(0)
    }

    fn hold(&mut self, user: Uuid) {
        self.free -= 1;
        *self.busy.entry(user).or_default() += 1;
    }

    fn unhold(&mut self, user: Uuid) {
        self.free += 1;
        if let Some(n) = self.busy.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.busy.remove(&user);
            }
        }
    }

    /// Takes the waiter to give a free connection to: of the users below their share, the one
    /// who holds the fewest, and of that user's requests the oldest. Requests that stopped
    /// waiting are dropped on the way.
    fn next_waiter(&mut self, per_user: usize) -> Option<Waiter> {
        self.waiting.retain(|waiter| !waiter.wake.is_closed());
        let (place, _) = self
            .waiting
            .iter()
            .enumerate()
            .map(|(place, waiter)| (place, self.held_by(waiter.user)))
            .filter(|(_, held)| *held < per_user)
            .min_by_key(|(place, held)| (*held, *place))?;
        self.waiting.remove(place)
    }
}

/// One of the pool's connections, held for a user's work; dropping it hands it on.
pub struct Share {
    /// None once handed back by a wake-up that found no one waiting for it.
    shares: Option<Arc<Shares>>,
    user: Uuid,
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(shares) = self.shares.take() {
            shares.release(self.user);
        }
    }
}

impl Shares {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `user`'s work no longer holds a connection: it goes to the next waiter, if any.
    fn release(self: &Arc<Shares>, mut user: Uuid) {
        loop {
            let waiter = {
                let mut state = self.lock();
                state.unhold(user);
                let Some(waiter) = state.next_waiter(self.per_user) else {
                    return;
                };
                state.hold(waiter.user);
                waiter
            };
            let share = Share {
                shares: Some(self.clone()),
                user: waiter.user,
            };
            match waiter.wake.send(share) {
                Ok(()) => return,
                // It stopped waiting just now: the connection goes to the next one.
                Err(mut share) => {
                    share.shares = None;
                    user = waiter.user;
                }
            }
        }
    }
}

impl ClientPool {
    /// The pool, each user allowed half its connections at once (at least one).
    pub fn new(pool: Pool) -> ClientPool {
        let size = pool.status().max_size;
        ClientPool {
            pool,
            shares: Arc::new(Shares {
                per_user: (size / 2).max(1),
                state: Mutex::new(State {
                    free: size,
                    ..State::default()
                }),
            }),
        }
    }

    /// A connection's share for `user`, if one is free and the user is below their share.
    pub fn try_share(&self, user: Uuid) -> Option<Share> {
        self.take(&mut self.shares.lock(), user)
    }

    fn take(&self, state: &mut State, user: Uuid) -> Option<Share> {
        // While a connection is free, whoever waits is at their share: a request below it
        // takes the connection.
        if state.free == 0 || state.held_by(user) >= self.shares.per_user {
            return None;
        }
        state.hold(user);
        Some(Share {
            shares: Some(self.shares.clone()),
            user,
        })
    }

    /// A share of a connection at once, or the place in the queue to wait for one and whether
    /// the user held their whole share when it joined the queue.
    fn take_or_wait(&self, user: Uuid) -> Result<Share, (oneshot::Receiver<Share>, bool)> {
        let mut state = self.shares.lock();
        if let Some(share) = self.take(&mut state, user) {
            return Ok(share);
        }
        let at_share = state.held_by(user) >= self.shares.per_user;
        let (wake, woken) = oneshot::channel();
        state.waiting.retain(|waiter| !waiter.wake.is_closed());
        state.waiting.push_back(Waiter { user, wake });
        Err((woken, at_share))
    }

    /// Waits for a share sent to the queue's place `woken`.
    async fn woken(woken: oneshot::Receiver<Share>) -> Share {
        woken.await.expect(
            "a waiter's sender is only dropped with a share sent or once it stopped waiting",
        )
    }

    /// A connection's share for `user`, waiting while the user holds their whole share or the
    /// pool is busy; freed connections go first to the users who hold the fewest.
    pub async fn share(&self, user: Uuid) -> Share {
        match self.take_or_wait(user) {
            Ok(share) => share,
            Err((woken, _)) => Self::woken(woken).await,
        }
    }

    /// A connection for `user`'s work, holding one of the user's shares until the work is done.
    /// It waits at most the pool's timeout in all: for the share, then for the pool.
    pub async fn get(&self, user: Uuid) -> Result<Lease, GetError> {
        let timeout = timeout_of(&self.pool);
        let deadline = tokio::time::Instant::now() + timeout;
        let share = match self.take_or_wait(user) {
            Ok(share) => share,
            Err((woken, at_share)) => {
                match tokio::time::timeout_at(deadline, Self::woken(woken)).await {
                    Ok(share) => share,
                    // The user's own requests held all of the user's share, from the start of
                    // the wait to its end.
                    Err(_)
                        if at_share && self.shares.lock().held_by(user) >= self.shares.per_user =>
                    {
                        return Err(GetError::Busy(self.shares.per_user, timeout))
                    }
                    Err(_) => return Err(GetError::Timeout(timeout)),
                }
            }
        };
        let client = tokio::time::timeout_at(deadline, self.pool.get())
            .await
            .map_err(|_| GetError::Timeout(timeout))??;
        Ok(Lease {
            client: Some(client),
            share: Some(share),
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize) -> ClientPool {
        let database: tokio_postgres::Config = "host=127.0.0.1 user=nobody".parse().unwrap();
        ClientPool::new(super::pool(&database, size, QUERY_TIMEOUT).unwrap())
    }

    /// Lets spawned tasks run until they wait again.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn waiter(pool: &ClientPool, user: Uuid) -> tokio::task::JoinHandle<Share> {
        let pool = pool.clone();
        tokio::spawn(async move { pool.share(user).await })
    }

    /// The share a waiter got, failing rather than waiting for ever if it got none.
    async fn got(waiter: tokio::task::JoinHandle<Share>, who: &str) -> Share {
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .unwrap_or_else(|_| panic!("{who} got no connection"))
            .unwrap()
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
        let waiting = waiter(&pool, alice);
        settle().await;
        drop(bobs);
        settle().await;
        assert!(!waiting.is_finished(), "bob's freed share went to alice");
        let mut held = held;
        held.pop();
        let fifth = got(waiting, "alice's fifth").await;
        assert!(pool.try_share(alice).is_none());
        drop(fifth);
        drop(held);
        // All freed: nothing is left in the bookkeeping.
        let state = pool.shares.lock();
        assert!(state.busy.is_empty());
        assert_eq!(state.free, 8);
    }

    #[tokio::test]
    async fn a_share_sent_to_a_request_that_stopped_waiting_goes_on() {
        let pool = pool(2);
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let alices = pool.try_share(alice).unwrap();
        let _bobs = pool.try_share(bob).unwrap();
        let gives_up = waiter(&pool, carol);
        settle().await;
        // The share is sent to carol's request, which is aborted before it runs again (one
        // thread: nothing runs between these lines).
        drop(alices);
        assert_eq!(pool.shares.lock().held_by(carol), 1);
        gives_up.abort();
        assert!(matches!(gives_up.await, Err(e) if e.is_cancelled()));
        // Dropped unreceived, it came back.
        let state = pool.shares.lock();
        assert_eq!((state.free, state.held_by(carol)), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waited_in_vain_says_whose_requests_held_it() {
        let pool = pool(2);
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let _alices = pool.try_share(alice).unwrap();
        // Alice at her share: her own requests held her back.
        assert!(matches!(pool.get(alice).await, Err(GetError::Busy(1, _))));
        // The pool full with others' work: not carol's doing.
        let _bobs = pool.try_share(bob).unwrap();
        assert!(matches!(pool.get(carol).await, Err(GetError::Timeout(_))));
        // A request that gave up is pruned by the next to queue (alice's by carol's); try_share
        // queues nothing.
        assert_eq!(pool.shares.lock().waiting.len(), 1);
        assert!(pool.try_share(carol).is_none());
        assert_eq!(pool.shares.lock().waiting.len(), 1);
        let _ = pool.take_or_wait(carol);
        assert_eq!(pool.shares.lock().waiting.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waited_for_the_pool_is_not_blamed_on_its_user() {
        // Two per user; alice and bob fill the pool.
        let pool = pool(4);
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let _alices: Vec<Share> = (0..2).map(|_| pool.try_share(alice).unwrap()).collect();
        let bobs: Vec<Share> = (0..2).map(|_| pool.try_share(bob).unwrap()).collect();
        // Two of carol's requests queue, then a third, with the pool full and carol below her
        // share.
        let first = waiter(&pool, carol);
        let second = waiter(&pool, carol);
        settle().await;
        let third = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get(carol).await.map(|_| ()) }
        });
        settle().await;
        // Bob's connections go to carol's first two: she reaches her share while the third
        // still waits, for the pool, not for her own requests.
        drop(bobs);
        let (_first, _second) = (got(first, "first").await, got(second, "second").await);
        assert!(matches!(third.await.unwrap(), Err(GetError::Timeout(_))));
    }

    #[tokio::test]
    async fn a_freed_connection_goes_to_the_waiting_user_who_holds_the_fewest() {
        // Four connections, two per user: alice and bob fill the pool between them.
        let pool = pool(4);
        let (alice, bob, carol, dave) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let mut alices: Vec<Share> = (0..2).map(|_| pool.try_share(alice).unwrap()).collect();
        let bobs: Vec<Share> = (0..2).map(|_| pool.try_share(bob).unwrap()).collect();
        assert!(pool.try_share(carol).is_none(), "the pool is full");
        // In order of arrival: alice again, carol, a request of dave's that gives up, dave.
        let alice_again = waiter(&pool, alice);
        settle().await;
        let carol_waits = waiter(&pool, carol);
        settle().await;
        let dave_gives_up = waiter(&pool, dave);
        settle().await;
        let dave_waits = waiter(&pool, dave);
        settle().await;
        dave_gives_up.abort();
        let _ = dave_gives_up.await;

        // Alice's own connection comes free: carol, who holds none, gets it before alice's
        // earlier request.
        drop(alices.pop());
        let carols = got(carol_waits, "carol").await;
        settle().await;
        assert!(!alice_again.is_finished());
        // Then dave (none held) before alice (one held); his request that gave up is skipped.
        drop(bobs);
        let daves = got(dave_waits, "dave").await;
        // And with one more free, alice, below her share again.
        let alices_second = got(alice_again, "alice").await;
        assert_eq!(pool.shares.lock().free, 0);
        drop((alices, alices_second, carols, daves));
        let state = pool.shares.lock();
        assert!(state.busy.is_empty() && state.waiting.is_empty());
        assert_eq!(state.free, 4);
    }
}
