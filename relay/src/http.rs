//! HTTP routes: the WebSocket upgrade, Prometheus metrics, and the small JSON API (health, status,
//! stats, and a consultation's message history).
//!
//! Tokens are verified before a socket is upgraded; every refusal is JSON
//! `{"error": "<code>", "message": "..."}` with the right status, produced in one place
//! ([`recover`]). This module turns requests into calls on the hub and the session; it holds no
//! state of its own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use warp::http::StatusCode;
use warp::reject::Reject;
use warp::{Filter, Rejection, Reply};

use uuid::Uuid;

use crate::authz::{Principal, Role};
use crate::config::DemoToken;
use crate::consult::{self, Before};
use crate::inspector;
use crate::limits::{Admission, Refusal};
use crate::listener::Health;
use crate::log;
use crate::metrics::{self, Metrics, Scrape};
use crate::protocol::ErrorCode;
use crate::serve::Gate;
use crate::session::{self, SessionContext};
use crate::token::{Issuer, TokenError, Verified};
use crate::upgrade::{self, NotAnUpgrade, Upgrade};

/// How long a scrape of `/metrics` waits for the event log's newest id; without it, the lag is
/// left out of that scrape.
const SCRAPE_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The path of the health check, for load balancers and orchestrators.
pub const HEALTH_PATH: &str = "/api/realtime/health";

/// Everything the routes need, cloned into each request.
#[derive(Clone)]
pub struct AppState {
    pub session: SessionContext,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// `relay dev` only: signs the demo users' tokens, fresh for each request.
    pub demo_issuer: Option<Arc<Issuer>>,
    /// `/metrics` is served on an address of its own (`RELAY_METRICS_BIND`), not with the rest.
    pub metrics_apart: bool,
    /// Open sockets against `RELAY_MAX_SOCKETS` and `RELAY_MAX_SOCKETS_PER_USER`.
    pub admission: Arc<Admission>,
    /// Client connections against what the open-file limit allows.
    pub connections: Gate,
}

#[derive(Debug)]
struct Unauthorized(TokenError);
impl Reject for Unauthorized {}

/// Any other refusal: its status, `error` code and message.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    code: &'static str,
    message: String,
}
impl Reject for Refused {}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> Rejection {
    warp::reject::custom(Refused {
        status,
        code,
        message: message.into(),
    })
}

pub fn routes(state: AppState) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let cors = api_cors(&state.session.limits.allowed_origins);
    let state_limits = state.session.limits.clone();
    // Here unless RELAY_METRICS_BIND gives it an address of its own.
    let metrics_here = !state.metrics_apart;
    let metrics = warp::any()
        .and_then(move || async move {
            if metrics_here {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(metrics_route(state.clone()));
    let with_state = warp::any().map(move || state.clone());

    let ws = warp::path!("ws")
        .and(warp::get())
        .and(allowed_origin(with_state.clone()))
        .and(authenticated(with_state.clone(), TokenIn::HeaderOrQuery))
        .and(upgrade::upgrade())
        .and_then(
            |state: AppState, verified: Verified, upgrade: Upgrade| async move {
                let ticket =
                    state
                        .admission
                        .admit(verified.principal.user_id)
                        .map_err(|refusal| {
                            let status = match refusal {
                                Refusal::TooManyForUser(_) => StatusCode::TOO_MANY_REQUESTS,
                                Refusal::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
                            };
                            refused(status, refusal.code(), refusal.to_string())
                        })?;
                let context = state.session.clone();
                let config = upgrade::config(context.limits.max_frame_bytes);
                Ok::<_, Rejection>(upgrade.reply(config, move |socket| {
                    session::run(socket, verified, context, ticket)
                }))
            },
        );

    let health = warp::path!("api" / "realtime" / "health")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: AppState| {
            let healthy = state.health.is_listening();
            let body = json!({
                "status": if healthy { "healthy" } else { "unhealthy" },
                "service": "realtime-relay",
                "activeSubscriptions": state.session.hub.active_subscriptions(),
                "timestamp": crate::rfc3339(SystemTime::now()),
            });
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            warp::reply::with_status(warp::reply::json(&body), status)
        });

    let page = warp::path::end()
        .and(warp::get())
        .map(|| inspector::file(inspector::INDEX, "text/html; charset=utf-8"));
    let script = warp::path!("inspector.js")
        .and(warp::get())
        .map(|| inspector::file(inspector::SCRIPT, "text/javascript; charset=utf-8"));
    let style = warp::path!("inspector.css")
        .and(warp::get())
        .map(|| inspector::file(inspector::STYLE, "text/css; charset=utf-8"));
    // The demo users' tokens for the inspector's picker: `relay dev` only; `[]` otherwise.
    let demo_tokens = warp::path!("dev" / "tokens")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: AppState| {
            let tokens: Vec<DemoToken> = state
                .demo_issuer
                .as_deref()
                .map(crate::dev::demo_tokens)
                .unwrap_or_default();
            warp::reply::json(&tokens)
        });

    let with_principal = authenticated(with_state.clone(), TokenIn::Header)
        .map(|state: AppState, verified: Verified| (state, verified.principal))
        .untuple_one();

    let status = warp::path!("api" / "realtime" / "status")
        .and(warp::get())
        .and(with_principal.clone())
        .map(|state: AppState, principal: Principal| {
            warp::reply::json(&json!({
                "userId": principal.user_id,
                "role": principal.role,
                "subscriptions": state.session.hub.subscriptions_of(&principal),
            }))
        });

    let history = warp::path!("api" / "consultations" / String / "messages")
        .and(warp::get())
        .and(with_principal.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and_then(
            |session: String,
             state: AppState,
             principal: Principal,
             query: HashMap<String, String>| async move {
                let (session_id, limit, before) = history_request(&session, &query)?;
                consult::history(&state.session.db, &principal, session_id, limit, before)
                    .await
                    .map(|history| warp::reply::json(&history))
                    .map_err(|refusal| {
                        let status = match refusal.code {
                            ErrorCode::NotFound => StatusCode::NOT_FOUND,
                            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
                            _ => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        refused(status, refusal.code.as_str(), refusal.message)
                    })
            },
        );

    let stats = warp::path!("api" / "realtime" / "stats")
        .and(warp::get())
        .and(with_principal)
        .and_then(|state: AppState, principal: Principal| async move {
            if principal.role != Role::Admin {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "stats are for admin tokens only",
                ));
            }
            let snapshot = state.session.hub.snapshot();
            let mut body = serde_json::to_value(snapshot).unwrap_or_default();
            body["timestamp"] = json!(crate::rfc3339(SystemTime::now()));
            Ok(warp::reply::json(&body))
        });

    // A page of an origin not allowed learns why its socket was refused from the one endpoint
    // that needs no token: a plain `GET` of the health check (a simple request, which a browser
    // sends without a preflight) gets 403 `origin_not_allowed` that any page may read. Browsers
    // show a page nothing of a refused upgrade, and the API's own answers, token-bearing
    // requests' refusals included, stay closed to such a page.
    let allowed = state_limits.allowed_origins.clone();
    let origin_refused = warp::path!("api" / "realtime" / "health")
        .and(warp::get())
        .and(warp::header::optional::<String>("origin"))
        .and_then(move |origin: Option<String>| {
            let refused = !origin_allowed(&allowed, origin.as_deref());
            async move {
                if refused {
                    let mut reply = error_reply(
                        StatusCode::FORBIDDEN,
                        "origin_not_allowed",
                        ORIGIN_NOT_ALLOWED,
                    );
                    let headers = reply.headers_mut();
                    headers.insert(
                        warp::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                        warp::http::HeaderValue::from_static("*"),
                    );
                    // The health check answers by origin: no cache may give one's to another.
                    headers.insert(
                        warp::http::header::VARY,
                        warp::http::HeaderValue::from_static("origin"),
                    );
                    Ok(reply)
                } else {
                    Err(warp::reject::not_found())
                }
            }
        });

    // The API answers pages of other origins (dashboards served elsewhere), its errors
    // included; the rest is for the relay's own page, probes and WebSocket clients, and no
    // preflight is answered for it.
    let api = under_api().and(
        health
            .or(status)
            .or(history)
            .or(stats)
            .recover(recover)
            .with(cors),
    );

    ws.or(page)
        .or(script)
        .or(style)
        .or(demo_tokens)
        .or(metrics)
        .or(origin_refused)
        .or(api)
        .recover(recover)
}

/// `GET /metrics`: the Prometheus text format.
fn metrics_route(
    state: AppState,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(warp::any().map(move || state.clone()))
        .then(|state: AppState| async move {
            let newest = async {
                let lease = crate::db::lease(&state.session.db.pool).await.ok()?;
                let newest = log::position(&***lease).await.ok();
                lease.finish();
                newest
            };
            let newest = tokio::time::timeout(SCRAPE_QUERY_TIMEOUT, newest)
                .await
                .ok()
                .flatten();
            let scrape = Scrape {
                listening: state.health.is_listening(),
                newest_event: newest.map(|cursor| cursor.0),
                presence_members: state.session.presence.member_count(),
                connections: (state.connections.open(), state.connections.limit()),
            };
            let text = metrics::render(&state.session.hub, &state.metrics, &scrape);
            warp::reply::with_header(text, "content-type", prometheus::TEXT_FORMAT)
        })
}

/// What the address of `RELAY_METRICS_BIND` serves: `/metrics`, and a 404 for anything else.
pub fn metrics_routes(
    state: AppState,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    metrics_route(state).recover(recover)
}

/// Requests whose path is under `/api/`, without taking the path.
fn under_api() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::path::peek()
        .and_then(|path: warp::path::Peek| async move {
            if path.as_str().starts_with("api/") {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
}

/// Cross-origin access to the HTTP API, for dashboards served from another origin than the
/// relay's: the origins of `RELAY_ALLOWED_ORIGINS` (every origin when it is unset, as for
/// sockets), `GET` with an `Authorization` header. No cookies are involved: the token is the
/// credential, sent by the page itself.
fn api_cors(allowed: &[String]) -> warp::cors::Builder {
    let cors = warp::cors()
        .allow_methods(["GET"])
        .allow_headers(["authorization"])
        .max_age(Duration::from_secs(600));
    if allowed.is_empty() {
        cors.allow_any_origin()
    } else {
        // Validated at start (config::parse_origin), so none of these can fail to parse.
        cors.allow_origins(allowed.iter().map(String::as_str))
    }
}

/// The session, page size and page end of a history request; 400 for anything malformed.
fn history_request(
    session: &str,
    query: &HashMap<String, String>,
) -> Result<(Uuid, i64, Option<Before>), Rejection> {
    let bad = |message: String| refused(StatusCode::BAD_REQUEST, "bad_request", message);
    let session_id = Uuid::parse_str(session)
        .map_err(|_| bad(format!("{session:?} is not a session id (a uuid)")))?;
    if let Some(name) = query
        .keys()
        .find(|name| !["limit", "before"].contains(&name.as_str()))
    {
        return Err(bad(format!(
            "unknown parameter `{name}`: the history takes limit and before"
        )));
    }
    let limit = match query.get("limit") {
        None => consult::DEFAULT_PAGE,
        Some(limit) => limit
            .parse()
            .ok()
            .filter(|n| (1..=consult::MAX_PAGE).contains(n))
            .ok_or_else(|| bad(format!("limit must be 1 to {}", consult::MAX_PAGE)))?,
    };
    let before = match query.get("before") {
        None => None,
        Some(before) => Some(before.parse().map_err(|()| {
            bad("before must be a message id or the next_before of a previous page".into())
        })?),
    };
    Ok((session_id, limit, before))
}

/// Refuses an upgrade from a browser page whose origin is not in `RELAY_ALLOWED_ORIGINS`, so a
/// page elsewhere cannot open a socket with a token it got hold of (cross-site WebSocket
/// hijacking). Clients that send no `Origin` (not browsers) pass.
fn allowed_origin(
    with_state: impl Filter<Extract = (AppState,), Error = Infallible> + Clone,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    with_state
        .and(warp::header::optional::<String>("origin"))
        .and_then(|state: AppState, origin: Option<String>| async move {
            if origin_allowed(&state.session.limits.allowed_origins, origin.as_deref()) {
                Ok(())
            } else {
                Err(refused(
                    StatusCode::FORBIDDEN,
                    "origin_not_allowed",
                    "this origin may not open sockets on this relay (RELAY_ALLOWED_ORIGINS)",
                ))
            }
        })
        .untuple_one()
}

/// Whether a request with this `Origin` header may open a socket or call the API: any without
/// the header (not from a browser), and every one while `RELAY_ALLOWED_ORIGINS` is empty.
fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    origin.is_none_or(|origin| {
        allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    })
}

/// What a page of an origin not allowed reads from the health check.
const ORIGIN_NOT_ALLOWED: &str = "this page's origin is not in the relay's RELAY_ALLOWED_ORIGINS: \
                                  it may not open sockets on this relay or call its API";

/// Where a route accepts the token. Only the WebSocket upgrade takes it from the query string,
/// because browsers cannot set headers on a WebSocket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenIn {
    Header,
    HeaderOrQuery,
}

/// The state and the caller's verified token; a missing or bad token rejects with 401.
fn authenticated(
    with_state: impl Filter<Extract = (AppState,), Error = Infallible> + Clone,
    token_in: TokenIn,
) -> impl Filter<Extract = (AppState, Verified), Error = Rejection> + Clone {
    with_state
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::query::<HashMap<String, String>>())
        .and_then(
            move |state: AppState, header: Option<String>, query: HashMap<String, String>| async move {
                let mut token = bearer(header.as_deref())?;
                if token.is_none() && token_in == TokenIn::HeaderOrQuery {
                    token = query.get("access_token").cloned();
                }
                let missing = match token_in {
                    TokenIn::Header => TokenError::MissingHeader,
                    TokenIn::HeaderOrQuery => TokenError::Missing,
                };
                authenticate(&state, token.as_deref(), missing).map(|verified| (state, verified))
            },
        )
        .untuple_one()
}

/// The token from an `Authorization: Bearer <jwt>` header, if there is such a header.
fn bearer(header: Option<&str>) -> Result<Option<String>, Rejection> {
    let Some(value) = header else {
        return Ok(None);
    };
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_string()))
        }
        _ => Err(warp::reject::custom(Unauthorized(TokenError::Invalid(
            "the Authorization header must be `Bearer <jwt>`".into(),
        )))),
    }
}

fn authenticate(
    state: &AppState,
    token: Option<&str>,
    missing: TokenError,
) -> Result<Verified, Rejection> {
    let token = token.ok_or(missing);
    token
        .and_then(|t| state.session.verifier.verify(t))
        .map_err(|e| warp::reject::custom(Unauthorized(e)))
}

fn error_reply(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    warp::reply::with_status(
        warp::reply::json(&json!({"error": code, "message": message})),
        status,
    )
    .into_response()
}

async fn recover(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let reply = if let Some(Unauthorized(e)) = rejection.find() {
        let mut response = error_reply(StatusCode::UNAUTHORIZED, e.code(), &e.to_string());
        response.headers_mut().insert(
            warp::http::header::WWW_AUTHENTICATE,
            warp::http::HeaderValue::from_static("Bearer"),
        );
        response
    } else if let Some(Refused {
        status,
        code,
        message,
    }) = rejection.find()
    {
        error_reply(*status, code, message)
    } else if rejection.is_not_found() {
        error_reply(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        error_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        )
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        error_reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the query string is malformed",
        )
    } else if rejection.find::<warp::cors::CorsForbidden>().is_some() {
        error_reply(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not call this relay's API (RELAY_ALLOWED_ORIGINS)",
        )
    } else if rejection.find::<NotAnUpgrade>().is_some() {
        error_reply(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint takes a WebSocket upgrade",
        )
    } else {
        error_reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request is malformed",
        )
    };
    Ok(reply)
}
