//! Consultations: sending a message and reading a session's history.
//!
//! Sending goes through `public.send_consultation_message` (`sql/004_consultations.sql`), which
//! checks every rule in the database, as the socket's user (`request.jwt.claims`, as row-level
//! security sees callers). Its SQLSTATEs become the `send` frame's error codes here.
//!
//! History is read in one REPEATABLE READ snapshot together with the event log's position in that
//! snapshot. Event ids follow commit order (`triggers/003_commit_order.sql`), so every change the
//! history shows has an id at or below that position and every change it does not show has a
//! higher one: a client that subscribes with `since` set to it gets exactly what the history
//! lacks, with no gap and no duplicate.

use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

use crate::authz::{self, Feed, Owners, Principal, Role};
use crate::db::{self, ClientPool};
use crate::log;
use crate::protocol::ErrorCode;

/// Messages per history page when the request names no limit, and the most it may name.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 200;

/// Why a send or a history read failed, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    fn not_leased(error: db::GetError) -> Refusal {
        match error {
            db::GetError::Busy(..) => Refusal::new(
                ErrorCode::Unavailable,
                format!("{error}; try again once they are answered (a send with the same client_id never creates a second message)"),
            ),
            other => Refusal::unavailable(&other),
        }
    }

    fn unavailable(cause: &(dyn std::error::Error + 'static)) -> Refusal {
        tracing::warn!(cause = %crate::Causes(cause), "a consultation query failed");
        Refusal::new(
            ErrorCode::Unavailable,
            "the relay could not reach the database; try again (a send with the same client_id \
             never creates a second message)",
        )
    }
}

/// The error code for a SQLSTATE raised by the consultation functions.
pub fn code_of(sqlstate: &str) -> Option<ErrorCode> {
    Some(match sqlstate {
        "RL404" => ErrorCode::NotFound,
        "RL403" => ErrorCode::Forbidden,
        "RL410" => ErrorCode::SessionEnded,
        "RL422" => ErrorCode::InvalidBody,
        "RL409" => ErrorCode::Conflict,
        // Characters the database cannot store (NUL, invalid encoding).
        "22021" | "22P05" => ErrorCode::InvalidBody,
        _ => return None,
    })
}

fn refusal_of(error: tokio_postgres::Error) -> Refusal {
    let rule = error
        .as_db_error()
        .and_then(|db| code_of(db.code().code()).map(|code| (code, db.message().to_string())));
    match rule {
        Some((code, message)) => Refusal::new(code, message),
        None => Refusal::unavailable(&error),
    }
}

/// A consultation session's participants, or None if there is no such session. Who may read a
/// session's messages is decided from these (`authz::may_see`), as the policies decide it.
pub async fn owners(
    client: &impl tokio_postgres::GenericClient,
    session_id: Uuid,
) -> Result<Option<Owners>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select patient_id, dentist_id from public.consultation_sessions where id = $1",
            &[&session_id],
        )
        .await?;
    Ok(row.map(|row| Owners {
        patient_id: row.get(0),
        dentist_id: row.get(1),
    }))
}

/// The claims row-level security reads for this user.
fn claims(principal: &Principal) -> String {
    json!({"sub": principal.user_id, "role": principal.role}).to_string()
}

/// Sends a message as `principal`; returns its id. A retry with the same `client_id` returns the
/// same id and creates nothing.
pub async fn send(
    db: &ClientPool,
    principal: &Principal,
    session_id: Uuid,
    body: &str,
    client_id: Uuid,
) -> Result<Uuid, Refusal> {
    if body.contains('\0') {
        // Postgres text cannot hold NUL; say so rather than fail in the database.
        return Err(Refusal::new(
            ErrorCode::InvalidBody,
            "a message body may not contain NUL characters",
        ));
    }
    let lease = db
        .get(principal.user_id)
        .await
        .map_err(Refusal::not_leased)?;
    let claims = claims(principal);
    let body = body.to_string();
    let outcome = db::bounded(lease, move |client| {
        Box::pin(async move {
            let tx = client
                .transaction()
                .await
                .map_err(|e| Refusal::unavailable(&e))?;
            tx.execute(
                "select set_config('request.jwt.claims', $1, true)",
                &[&claims],
            )
            .await
            .map_err(|e| Refusal::unavailable(&e))?;
            let row = tx
                .query_one(
                    "select id from public.send_consultation_message($1, $2, $3)",
                    &[&session_id, &body, &client_id],
                )
                .await
                .map_err(refusal_of)?;
            tx.commit().await.map_err(|e| Refusal::unavailable(&e))?;
            Ok(row.get(0))
        })
    })
    .await;
    outcome.map_err(|e| Refusal::unavailable(&e))?
}

/// Where a history page ends: before this message (by id), or before a position given by an
/// earlier page's `next_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    Message(Uuid),
    /// `created_at` in microseconds since the Unix epoch, and the id: the keyset of the oldest
    /// message of the previous page, which stays valid even if that message is deleted.
    Key(i64, Uuid),
}

impl std::str::FromStr for Before {
    type Err = ();

    fn from_str(s: &str) -> Result<Before, ()> {
        if let Ok(id) = Uuid::parse_str(s) {
            return Ok(Before::Message(id));
        }
        let (micros, id) = s.split_once('.').ok_or(())?;
        if micros.is_empty() || !micros.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        let micros: i64 = micros.parse().map_err(|_| ())?;
        // No message is written after the year 9999; later keys would overflow Postgres'
        // timestamps, and they come from no page.
        if micros > LAST_MICROS {
            return Err(());
        }
        Ok(Before::Key(micros, Uuid::parse_str(id).map_err(|_| ())?))
    }
}

/// 9999-12-31T23:59:59.999999Z, in microseconds since the Unix epoch.
const LAST_MICROS: i64 = 253_402_300_799_999_999;

/// One page of a session's messages, newest first.
#[derive(Debug, Serialize)]
pub struct History {
    pub session_id: Uuid,
    /// Rows as the `consultation_messages` feed carries them.
    pub messages: Vec<Value>,
    /// The first page only (no `before`): subscribe to `consultation_messages` with this `since`
    /// (and the session filter) to get every change after this page, live. Later pages have
    /// none: the first page's cursor is the one that meets the live feed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Pass as `before` for the next, older page; null on the last page.
    pub next_before: Option<String>,
}

/// Reads up to `limit` messages of a session before `before`, if `principal` may read the
/// session's messages (by the same rule as the feed).
pub async fn history(
    db: &ClientPool,
    principal: &Principal,
    session_id: Uuid,
    limit: i64,
    before: Option<Before>,
) -> Result<History, Refusal> {
    // Many requests at once from one user queue behind each other, not in front of other
    // users'; one that waited its whole time for the user's share is refused.
    let lease = db.get(principal.user_id).await.map_err(|e| match e {
        db::GetError::Busy(..) => Refusal::new(
            ErrorCode::TooManyRequests,
            format!("{e}; wait for them to be answered, then try again"),
        ),
        other => Refusal::not_leased(other),
    })?;
    let principal = *principal;
    let outcome = db::bounded(lease, move |client| {
        Box::pin(async move {
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| Refusal::unavailable(&e))?;
            let unavailable = |e: tokio_postgres::Error| Refusal::unavailable(&e);
            // The first query takes the snapshot every later one reads.
            let (position, _) = log::mark(&*tx).await.map_err(unavailable)?;
            let session = owners(&*tx, session_id).await.map_err(unavailable)?;
            // As for a subscription's filter, a session that does not exist and one that is someone
            // else's look the same; only admins, who may read every session, learn which it is.
            match session {
                Some(owners) if authz::may_see(&principal, Feed::ConsultationMessages, &owners) => {
                }
                None if principal.role == Role::Admin => {
                    return Err(Refusal::new(
                        ErrorCode::NotFound,
                        format!("session {session_id} does not exist"),
                    ))
                }
                _ => {
                    return Err(Refusal::new(
                        ErrorCode::Forbidden,
                        format!("session {session_id} is not one of yours"),
                    ))
                }
            }
            let key = match before {
                None => None,
                Some(Before::Key(micros, id)) => Some((micros, id)),
                Some(Before::Message(id)) => {
                    let row = tx
                        .query_opt(
                            "select (extract(epoch from created_at) * 1000000)::bigint \
                         from public.consultation_messages where id = $1 and session_id = $2",
                            &[&id, &session_id],
                        )
                        .await
                        .map_err(unavailable)?
                        .ok_or_else(|| {
                            Refusal::new(
                                ErrorCode::BadRequest,
                                format!(
                                    "`before` names no message of session {session_id}; pass the \
                                 `next_before` of the previous page"
                                ),
                            )
                        })?;
                    Some((row.get(0), id))
                }
            };
            let rows = tx
            .query(
                "select to_jsonb(m), (extract(epoch from m.created_at) * 1000000)::bigint, m.id \
                 from public.consultation_messages m \
                 where m.session_id = $1 \
                   and ($2::bigint is null or (m.created_at, m.id) < \
                        (timestamptz 'epoch' + $2::bigint * interval '1 microsecond', $3::uuid)) \
                 order by m.created_at desc, m.id desc \
                 limit $4",
                &[
                    &session_id,
                    &key.map(|(micros, _)| micros),
                    &key.map(|(_, id)| id),
                    &(limit + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            let more = rows.len() as i64 > limit;
            let page = &rows[..rows.len().min(limit as usize)];
            let next_before = more
                .then(|| page.last())
                .flatten()
                .map(|row| format!("{}.{}", row.get::<_, i64>(1), row.get::<_, Uuid>(2)));
            Ok(History {
                session_id,
                messages: page.iter().map(|row| row.get(0)).collect(),
                cursor: before.is_none().then(|| position.to_string()),
                next_before,
            })
        })
    })
    .await;
    outcome.map_err(|e| Refusal::unavailable(&e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_takes_a_message_id_or_a_page_key() {
        let id = Uuid::new_v4();
        assert_eq!(id.to_string().parse(), Ok(Before::Message(id)));
        assert_eq!(
            format!("1763733031728615.{id}").parse(),
            Ok(Before::Key(1763733031728615, id))
        );
        assert_eq!(
            format!("{LAST_MICROS}.{id}").parse(),
            Ok(Before::Key(LAST_MICROS, id))
        );
        for bad in [
            "",
            "42",
            "x.y",
            ".{id}",
            "-1.00000000-0000-0000-0000-000000000000",
            "253402300800000000.00000000-0000-0000-0000-000000000000",
            "9223372036854775807.00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(bad.parse::<Before>(), Err(()), "{bad}");
        }
    }

    #[test]
    fn each_rule_sqlstate_has_its_code() {
        assert_eq!(code_of("RL404"), Some(ErrorCode::NotFound));
        assert_eq!(code_of("RL403"), Some(ErrorCode::Forbidden));
        assert_eq!(code_of("RL410"), Some(ErrorCode::SessionEnded));
        assert_eq!(code_of("RL422"), Some(ErrorCode::InvalidBody));
        assert_eq!(code_of("RL409"), Some(ErrorCode::Conflict));
        assert_eq!(code_of("23505"), None);
    }
}
