//! Access tokens: verifying the JWTs clients present and issuing tokens for development.
//!
//! Tokens are HS256 JWTs signed with `RELAY_JWT_SECRET`, with the claims `sub` (the user's uuid),
//! `role` (admin, dentist, patient or chatbot) and `exp`. The algorithm is fixed, so a token that
//! names another (`none`, RS256) is refused. Errors never include the token itself.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::authz::{Principal, Role};

/// Clock skew tolerated on `exp` unless configured otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The shortest secret accepted: HS256 is only as strong as its key.
pub const MIN_SECRET_BYTES: usize = 32;

/// The HS256 signing secret. Its Debug output never shows the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Accepts a secret of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(value: impl Into<String>) -> Result<Secret, String> {
        let value = value.into();
        if value.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "must be at least {MIN_SECRET_BYTES} bytes long (got {})",
                value.len()
            ));
        }
        Ok(Secret(value))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a token was refused. Each maps to the `error` code of the HTTP 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no access token: send `Authorization: Bearer <jwt>` or the `access_token` query parameter"
    )]
    Missing,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token's signature is not valid")]
    BadSignature,
    #[error("the access token is not valid: {0}")]
    Invalid(&'static str),
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::Expired => "token_expired",
            TokenError::BadSignature => "invalid_signature",
            TokenError::Invalid(_) => "invalid_token",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// A token that passed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub principal: Principal,
    /// When the token stops being valid (its `exp` plus the leeway); a socket opened with it is
    /// closed then.
    pub expires_at: SystemTime,
}

/// Verifies and issues tokens with one secret.
#[derive(Clone)]
pub struct Keys {
    /// Clock skew tolerated on `exp`, in seconds.
    leeway: u64,
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(HS256)")
    }
}

impl Keys {
    /// Keys with the default leeway.
    pub fn new(secret: &Secret) -> Keys {
        Keys::with_leeway(secret, DEFAULT_LEEWAY)
    }

    pub fn with_leeway(secret: &Secret, leeway: Duration) -> Keys {
        let leeway = leeway.as_secs();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        Keys {
            leeway,
            decoding: DecodingKey::from_secret(secret.bytes()),
            encoding: EncodingKey::from_secret(secret.bytes()),
            validation,
        }
    }

    /// Checks a token and returns who it speaks for, and until when.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::Invalid("it must be signed with HS256")
                }
                ErrorKind::MissingRequiredClaim(_) => {
                    TokenError::Invalid("the `exp` claim is required")
                }
                ErrorKind::Json(_) => {
                    TokenError::Invalid("its claims are malformed (is `exp` a number?)")
                }
                _ => TokenError::Invalid("it is not a well-formed JWT"),
            })?;
        let claims = data.claims;
        let user_id = claims
            .sub
            .as_deref()
            .ok_or(TokenError::Invalid("the `sub` claim is required"))
            .and_then(|s| {
                // Only the hyphenated form, the one `auth.uid()` accepts in SQL: a `sub` that SQL
                // reads as no user must not be a user here either.
                Uuid::try_parse(s)
                    .ok()
                    .filter(|_| s.len() == 36)
                    .ok_or(TokenError::Invalid(
                        "the `sub` claim must be a hyphenated uuid",
                    ))
            })?;
        let role = claims
            .role
            .as_deref()
            .ok_or(TokenError::Invalid("the `role` claim is required"))
            .and_then(|r| {
                r.parse::<Role>().map_err(|_| {
                    TokenError::Invalid(
                        "the `role` claim must be admin, dentist, patient or chatbot",
                    )
                })
            })?;
        let expires_at = UNIX_EPOCH + Duration::from_secs(claims.exp.saturating_add(self.leeway));
        Ok(Verified {
            principal: Principal { user_id, role },
            expires_at,
        })
    }

    /// Issues a token for `principal` that expires after `ttl`.
    pub fn issue(&self, principal: &Principal, ttl: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: Some(principal.user_id.to_string()),
            role: Some(principal.role.as_str().to_string()),
            exp: now + ttl.as_secs(),
            iat: Some(now),
        };
        // Encoding known claims with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }
}

/// Parses a duration such as `90s`, `15m`, `1h` or `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 15m, 1h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "ms" => return Ok(Duration::from_millis(number)),
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&Secret::new("a".repeat(32)).unwrap())
    }

    #[test]
    fn issued_tokens_verify() {
        let principal = Principal {
            user_id: Uuid::new_v4(),
            role: Role::Dentist,
        };
        let token = keys().issue(&principal, Duration::from_secs(60));
        assert_eq!(keys().verify(&token).map(|v| v.principal), Ok(principal));
    }

    #[test]
    fn refuses_bad_tokens_with_specific_codes() {
        let principal = Principal {
            user_id: Uuid::new_v4(),
            role: Role::Patient,
        };
        let other = Keys::new(&Secret::new("b".repeat(32)).unwrap());
        let token = other.issue(&principal, Duration::from_secs(60));
        assert_eq!(
            keys().verify(&token).unwrap_err().code(),
            "invalid_signature"
        );
        assert_eq!(
            keys().verify("garbage").unwrap_err().code(),
            "invalid_token"
        );

        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret("a".repeat(32).as_bytes()),
            )
            .unwrap()
        };
        let later = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let expired =
            sign(serde_json::json!({"sub": Uuid::new_v4(), "role": "admin", "exp": later - 4000}));
        assert_eq!(keys().verify(&expired).unwrap_err(), TokenError::Expired);
        for claims in [
            serde_json::json!({"role": "admin", "exp": later}),
            serde_json::json!({"sub": "nobody", "role": "admin", "exp": later}),
            serde_json::json!({"sub": Uuid::new_v4().simple().to_string(), "role": "admin", "exp": later}),
            serde_json::json!({"sub": format!("{{{}}}", Uuid::new_v4()), "role": "admin", "exp": later}),
            serde_json::json!({"sub": Uuid::new_v4(), "exp": later}),
            serde_json::json!({"sub": Uuid::new_v4(), "role": "root", "exp": later}),
            serde_json::json!({"sub": Uuid::new_v4(), "role": "admin"}),
        ] {
            let err = keys().verify(&sign(claims.clone())).unwrap_err();
            assert_eq!(err.code(), "invalid_token", "{claims}");
        }
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDEiLCJyb2xlIjoiYWRtaW4iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(keys().verify(none).is_err());
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        assert!(Secret::new("short").is_err());
        let secret = Secret::new("s".repeat(40)).unwrap();
        assert!(!format!("{secret:?}").contains("sss"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        for bad in ["", "h", "1y", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
