//! The inspector page at `/`: static files from the repository's `inspector/` directory, embedded
//! in the binary so that it serves them with no build step and no files beside it.

use warp::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use warp::http::{HeaderValue, Response};

pub const INDEX: &str = include_str!("../../inspector/index.html");
pub const SCRIPT: &str = include_str!("../../inspector/inspector.js");
pub const STYLE: &str = include_str!("../../inspector/inspector.css");

/// Only this relay's own script, style and sockets (`'self'` covers its ws: and wss: too): the
/// page loads nothing from elsewhere.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One of the page's files with its content type and headers.
pub fn file(body: &'static str, content_type: &'static str) -> Response<String> {
    let mut response = Response::new(body.to_string());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}
