//! Access tokens: verifying the JWTs clients present, and issuing HS256 tokens for development.
//!
//! A token carries `sub` (the user's uuid), `role` (admin, dentist, patient or chatbot) and `exp`,
//! optionally `nbf`, `aud` and `iss`. The algorithm is pinned by configuration (`RELAY_JWT_ALG`):
//! HS256 with a shared secret, or RS256/ES256 with a public key from a PEM file or a JWKS file. A
//! token naming any other algorithm, `none` included, is refused, and a key is only ever used with
//! the algorithm it was configured for, so an HS256 token signed with an RSA public key as its
//! secret cannot pass. Errors never include the token itself.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::authz::{Principal, Role};

/// Clock skew tolerated on `exp` and `nbf` unless configured otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The latest `exp` accepted: the last second of the year 9999. A later one is not a time in
/// seconds (often milliseconds by mistake), and no socket may be promised that long.
pub const MAX_EXP: u64 = 253_402_300_799;

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

    /// Whether this is that secret.
    pub fn is(&self, value: &str) -> bool {
        self.bytes() == value.as_bytes()
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

/// A token as a client sent it. Its Debug output never shows the value, so a frame or request
/// that holds one can be logged without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct RawToken(pub String);

impl fmt::Debug for RawToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawToken(..)")
    }
}

/// The signing algorithms the relay accepts; exactly one is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC with SHA-256 and a shared secret (`RELAY_JWT_SECRET`).
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256 and a public key.
    Rs256,
    /// ECDSA on P-256 with SHA-256 and a public key.
    Es256,
}

impl Algorithm {
    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
            Algorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
            Algorithm::Es256 => jsonwebtoken::Algorithm::ES256,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Algorithm, String> {
        match s {
            "HS256" => Ok(Algorithm::Hs256),
            "RS256" => Ok(Algorithm::Rs256),
            "ES256" => Ok(Algorithm::Es256),
            _ => Err(format!("{s:?} is not supported: use HS256, RS256 or ES256")),
        }
    }
}

/// Where the verifying key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// The shared secret (HS256).
    Secret(Secret),
    /// One public key in a PEM file (RS256, ES256).
    PublicKeyFile(PathBuf),
    /// A JSON Web Key Set file (RS256, ES256); a token's `kid` picks the key.
    JwksFile(PathBuf),
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub algorithm: Algorithm,
    pub key: KeySource,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// When set, a token's `aud` must name it.
    pub audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
}

impl TokenConfig {
    /// HS256 with `secret` and the default leeway, no audience or issuer check.
    pub fn hs256(secret: Secret) -> TokenConfig {
        TokenConfig {
            algorithm: Algorithm::Hs256,
            key: KeySource::Secret(secret),
            leeway: DEFAULT_LEEWAY,
            audience: None,
            issuer: None,
        }
    }
}

/// Why the configured key cannot be used. Reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a {algorithm} public key in PEM form: {cause}")]
    Pem {
        path: PathBuf,
        algorithm: Algorithm,
        cause: String,
    },
    #[error("{path} is not a JWKS file (a JSON object with a `keys` array): {cause}")]
    Jwks { path: PathBuf, cause: String },
    #[error("{path} has no key usable with {algorithm} (an {kty} signing key)")]
    NoUsableKey {
        path: PathBuf,
        algorithm: Algorithm,
        kty: &'static str,
    },
    #[error("RELAY_JWT_ALG={algorithm} needs {needs}")]
    Mismatch {
        algorithm: Algorithm,
        needs: &'static str,
    },
}

/// Why a token was refused. Each maps to the `error` code of the HTTP 401 body or the `error`
/// frame answering an `auth` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no access token: send `Authorization: Bearer <jwt>` or the `access_token` query parameter"
    )]
    Missing,
    /// Missing where only the header is read (the HTTP API).
    #[error("no access token: send `Authorization: Bearer <jwt>`")]
    MissingHeader,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid yet (`nbf` is in the future)")]
    NotYetValid,
    #[error("the access token's signature is not valid")]
    BadSignature,
    #[error("the access token is not valid: {0}")]
    Invalid(String),
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing | TokenError::MissingHeader => "missing_token",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::BadSignature => "invalid_signature",
            TokenError::Invalid(_) => "invalid_token",
        }
    }

    fn invalid(message: impl Into<String>) -> TokenError {
        TokenError::Invalid(message.into())
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
    /// closed then, unless the client sends a fresh token first.
    pub expires_at: SystemTime,
}

/// The verifying keys: one, or a set chosen by `kid`.
enum Keys {
    One(DecodingKey),
    Set(Vec<(Option<String>, DecodingKey)>),
}

/// Verifies tokens with the configured algorithm and key.
pub struct Verifier {
    algorithm: Algorithm,
    keys: Keys,
    validation: Validation,
    /// Clock skew tolerated on `exp`, in seconds.
    leeway: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier({})", self.algorithm)
    }
}

impl Verifier {
    /// Loads the configured key; fails with a message naming the file and the problem.
    pub fn load(config: &TokenConfig) -> Result<Verifier, KeyError> {
        let algorithm = config.algorithm;
        let keys = match (&config.key, algorithm) {
            (KeySource::Secret(secret), Algorithm::Hs256) => {
                Keys::One(DecodingKey::from_secret(secret.bytes()))
            }
            (KeySource::Secret(_), _) => {
                return Err(KeyError::Mismatch {
                    algorithm,
                    needs: "RELAY_JWT_PUBLIC_KEY_FILE or RELAY_JWKS_FILE, not a secret",
                })
            }
            (_, Algorithm::Hs256) => {
                return Err(KeyError::Mismatch {
                    algorithm,
                    needs: "RELAY_JWT_SECRET, not a public key",
                })
            }
            (KeySource::PublicKeyFile(path), _) => Keys::One(load_pem(path, algorithm)?),
            (KeySource::JwksFile(path), _) => Keys::Set(load_jwks(path, algorithm)?),
        };
        let leeway = config.leeway.as_secs();
        let mut validation = Validation::new(algorithm.jwt());
        validation.leeway = leeway;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        validation.validate_aud = config.audience.is_some();
        if let Some(audience) = &config.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            algorithm,
            keys,
            validation,
            leeway,
        })
    }

    /// The key for a token: the only one, or the one its `kid` names.
    fn key_for(&self, token: &str) -> Result<&DecodingKey, TokenError> {
        let set = match &self.keys {
            Keys::One(key) => return Ok(key),
            Keys::Set(set) => set,
        };
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::invalid("it is not a well-formed JWT"))?;
        match (header.kid.as_deref(), set.as_slice()) {
            (Some(kid), _) => set
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid))
                .map(|(_, key)| key)
                .ok_or_else(|| TokenError::invalid("its `kid` names no key this relay trusts")),
            (None, [(_, key)]) => Ok(key),
            (None, _) => Err(TokenError::invalid(
                "it has no `kid`, and the relay trusts several keys",
            )),
        }
    }

    /// Checks a token and returns who it speaks for, and until when.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let key = self.key_for(token)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::invalid(format!("it must be signed with {}", self.algorithm))
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    TokenError::invalid(format!("the `{claim}` claim is required"))
                }
                ErrorKind::InvalidAudience => {
                    TokenError::invalid("its `aud` claim does not name this relay")
                }
                ErrorKind::InvalidIssuer => {
                    TokenError::invalid("its `iss` claim is not the trusted issuer")
                }
                ErrorKind::InvalidClaimFormat(claim) => {
                    TokenError::invalid(format!("its `{claim}` claim is malformed"))
                }
                ErrorKind::Json(cause) if cause.to_string().contains("missing field `exp`") => {
                    TokenError::invalid("the `exp` claim is required")
                }
                ErrorKind::Json(_) => TokenError::invalid(
                    "its claims are malformed: `exp`, `nbf` and `iat` are whole seconds since the \
                         epoch, `sub` and `role` strings",
                ),
                _ => TokenError::invalid("it is not a well-formed JWT"),
            }
            })?;
        let claims = data.claims;
        let user_id = claims
            .sub
            .as_deref()
            .ok_or_else(|| TokenError::invalid("the `sub` claim is required"))
            .and_then(|s| {
                // Only the hyphenated form, the one `auth.uid()` accepts in SQL: a `sub` that SQL
                // reads as no user must not be a user here either.
                Uuid::try_parse(s)
                    .ok()
                    .filter(|_| s.len() == 36)
                    .ok_or_else(|| TokenError::invalid("the `sub` claim must be a hyphenated uuid"))
            })?;
        let role = claims
            .role
            .as_deref()
            .ok_or_else(|| TokenError::invalid("the `role` claim is required"))
            .and_then(|r| {
                r.parse::<Role>().map_err(|_| {
                    TokenError::invalid(
                        "the `role` claim must be admin, dentist, patient or chatbot",
                    )
                })
            })?;
        if claims.exp > MAX_EXP {
            return Err(TokenError::invalid(
                "its `exp` is not a time in seconds since the epoch",
            ));
        }
        let expires_at = UNIX_EPOCH + Duration::from_secs(claims.exp + self.leeway);
        Ok(Verified {
            principal: Principal { user_id, role },
            expires_at,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_pem(path: &Path, algorithm: Algorithm) -> Result<DecodingKey, KeyError> {
    let pem = read(path)?;
    let key = match algorithm {
        Algorithm::Rs256 => DecodingKey::from_rsa_pem(&pem),
        _ => DecodingKey::from_ec_pem(&pem),
    };
    key.map_err(|e| KeyError::Pem {
        path: path.to_path_buf(),
        algorithm,
        cause: e.to_string(),
    })
}

/// The keys of a JWKS file usable with `algorithm`: of its key type (and curve), meant for
/// signatures, and not meant for another algorithm. Other keys are ignored.
fn load_jwks(
    path: &Path,
    algorithm: Algorithm,
) -> Result<Vec<(Option<String>, DecodingKey)>, KeyError> {
    let set: JwkSet = serde_json::from_slice(&read(path)?).map_err(|e| KeyError::Jwks {
        path: path.to_path_buf(),
        cause: e.to_string(),
    })?;
    let keys: Vec<_> = set
        .keys
        .iter()
        .filter(|jwk| {
            let fits = match (&jwk.algorithm, algorithm) {
                (AlgorithmParameters::RSA(_), Algorithm::Rs256) => true,
                (AlgorithmParameters::EllipticCurve(ec), Algorithm::Es256) => {
                    ec.curve == EllipticCurve::P256
                }
                _ => false,
            };
            let for_signing = !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
            let same_alg = jwk
                .common
                .key_algorithm
                .is_none_or(|alg| alg.to_string() == algorithm.as_str());
            fits && for_signing && same_alg
        })
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some((jwk.common.key_id.clone(), key))
        })
        .collect();
    if keys.is_empty() {
        return Err(KeyError::NoUsableKey {
            path: path.to_path_buf(),
            algorithm,
            kty: if algorithm == Algorithm::Rs256 {
                "RSA"
            } else {
                "EC P-256"
            },
        });
    }
    Ok(keys)
}

/// Issues HS256 tokens, for `relay token`, `relay dev` and tests.
#[derive(Clone)]
pub struct Issuer {
    key: EncodingKey,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Issuer(HS256)")
    }
}

impl Issuer {
    pub fn new(secret: &Secret) -> Issuer {
        Issuer {
            key: EncodingKey::from_secret(secret.bytes()),
        }
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
        jsonwebtoken::encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &self.key,
        )
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
    use jsonwebtoken::jwk::Jwk;
    use serde_json::{json, Value};

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/keys");

    fn fixture(name: &str) -> PathBuf {
        Path::new(KEYS).join(name)
    }

    fn secret() -> Secret {
        Secret::new("a".repeat(32)).unwrap()
    }

    fn hs256() -> Verifier {
        Verifier::load(&TokenConfig::hs256(secret())).unwrap()
    }

    fn with_key(algorithm: Algorithm, key: KeySource) -> TokenConfig {
        TokenConfig {
            algorithm,
            key,
            ..TokenConfig::hs256(secret())
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims() -> Value {
        json!({"sub": Uuid::new_v4(), "role": "dentist", "exp": now() + 600})
    }

    fn sign_with(
        alg: jsonwebtoken::Algorithm,
        kid: Option<&str>,
        claims: &Value,
        key: &EncodingKey,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn hs(claims: &Value) -> String {
        sign_with(
            jsonwebtoken::Algorithm::HS256,
            None,
            claims,
            &EncodingKey::from_secret("a".repeat(32).as_bytes()),
        )
    }

    fn private(name: &str) -> EncodingKey {
        let pem = std::fs::read(fixture(name)).unwrap();
        if name.starts_with("es") {
            EncodingKey::from_ec_pem(&pem).unwrap()
        } else {
            EncodingKey::from_rsa_pem(&pem).unwrap()
        }
    }

    fn rs(claims: &Value, key: &str, kid: Option<&str>) -> String {
        sign_with(jsonwebtoken::Algorithm::RS256, kid, claims, &private(key))
    }

    fn es(claims: &Value) -> String {
        sign_with(
            jsonwebtoken::Algorithm::ES256,
            None,
            claims,
            &private("es256-private.pem"),
        )
    }

    /// A JWKS file holding the given keys, in a fresh temporary directory.
    fn jwks_file(keys: Vec<Value>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-jwks-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, json!({"keys": keys}).to_string()).unwrap();
        path
    }

    fn jwk(private_key: &str, alg: jsonwebtoken::Algorithm, kid: &str) -> Value {
        let mut jwk = Jwk::from_encoding_key(&self::private(private_key), alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        serde_json::to_value(jwk).unwrap()
    }

    fn code(verifier: &Verifier, token: &str) -> &'static str {
        verifier
            .verify(token)
            .map(|_| "ok")
            .unwrap_or_else(|e| e.code())
    }

    #[test]
    fn issued_tokens_verify() {
        let principal = Principal {
            user_id: Uuid::new_v4(),
            role: Role::Dentist,
        };
        let token = Issuer::new(&secret()).issue(&principal, Duration::from_secs(60));
        assert_eq!(hs256().verify(&token).map(|v| v.principal), Ok(principal));
    }

    #[test]
    fn refuses_bad_tokens_with_specific_codes() {
        let other = Issuer::new(&Secret::new("b".repeat(32)).unwrap());
        let principal = Principal {
            user_id: Uuid::new_v4(),
            role: Role::Patient,
        };
        let token = other.issue(&principal, Duration::from_secs(60));
        assert_eq!(code(&hs256(), &token), "invalid_signature");
        assert_eq!(code(&hs256(), "garbage"), "invalid_token");
        let later = now() + 600;
        let expired = json!({"sub": Uuid::new_v4(), "role": "admin", "exp": later - 4000});
        assert_eq!(code(&hs256(), &hs(&expired)), "token_expired");
        for claims in [
            json!({"role": "admin", "exp": later}),
            json!({"sub": "nobody", "role": "admin", "exp": later}),
            json!({"sub": Uuid::new_v4().simple().to_string(), "role": "admin", "exp": later}),
            json!({"sub": format!("{{{}}}", Uuid::new_v4()), "role": "admin", "exp": later}),
            json!({"sub": Uuid::new_v4(), "exp": later}),
            json!({"sub": Uuid::new_v4(), "role": "root", "exp": later}),
            json!({"sub": Uuid::new_v4(), "role": "admin"}),
            json!({"sub": Uuid::new_v4(), "role": "admin", "exp": "tomorrow"}),
            // Milliseconds by mistake, and beyond what a SystemTime can hold.
            json!({"sub": Uuid::new_v4(), "role": "admin", "exp": 1_795_262_487_000_000u64}),
            json!({"sub": Uuid::new_v4(), "role": "admin", "exp": u64::MAX}),
        ] {
            assert_eq!(code(&hs256(), &hs(&claims)), "invalid_token", "{claims}");
        }
        // Each says what is wrong with it.
        let message = |claims: Value| hs256().verify(&hs(&claims)).unwrap_err().to_string();
        let missing = message(json!({"sub": Uuid::new_v4(), "role": "admin"}));
        assert!(missing.contains("the `exp` claim is required"), "{missing}");
        let fraction = message(json!({"sub": Uuid::new_v4(), "role": "admin", "exp": 1.5}));
        assert!(fraction.contains("whole seconds"), "{fraction}");
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDEiLCJyb2xlIjoiYWRtaW4iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert_eq!(code(&hs256(), none), "invalid_token");
    }

    #[test]
    fn exp_and_nbf_are_checked_with_the_leeway() {
        let verifier = hs256(); // 30 s of leeway
        let mut claims = claims();
        claims["exp"] = json!(now() - 10);
        assert_eq!(
            code(&verifier, &hs(&claims)),
            "ok",
            "expired within the leeway"
        );
        claims["exp"] = json!(now() + 600);
        claims["nbf"] = json!(now() + 10);
        assert_eq!(
            code(&verifier, &hs(&claims)),
            "ok",
            "not yet valid within the leeway"
        );
        claims["nbf"] = json!(now() + 300);
        assert_eq!(code(&verifier, &hs(&claims)), "token_not_yet_valid");
        let strict = Verifier::load(&TokenConfig {
            leeway: Duration::ZERO,
            ..TokenConfig::hs256(secret())
        })
        .unwrap();
        claims["nbf"] = json!(now() + 5);
        assert_eq!(code(&strict, &hs(&claims)), "token_not_yet_valid");
        claims["nbf"] = json!(now() - 5);
        claims["exp"] = json!(now() - 1);
        assert_eq!(code(&strict, &hs(&claims)), "token_expired");
    }

    #[test]
    fn rs256_and_es256_with_a_pem_public_key() {
        let rsa = Verifier::load(&with_key(
            Algorithm::Rs256,
            KeySource::PublicKeyFile(fixture("rs256-public.pem")),
        ))
        .unwrap();
        let ec = Verifier::load(&with_key(
            Algorithm::Es256,
            KeySource::PublicKeyFile(fixture("es256-public.pem")),
        ))
        .unwrap();
        let claims = claims();
        assert_eq!(code(&rsa, &rs(&claims, "rs256-private.pem", None)), "ok");
        assert_eq!(code(&ec, &es(&claims)), "ok");
        assert_eq!(
            code(&rsa, &rs(&claims, "rs256-other-private.pem", None)),
            "invalid_signature"
        );
        // The algorithm is pinned: an ES256 token to an RS256 relay and the reverse, an HS256
        // token (even one whose "secret" is the public key, the classic confusion) and `none`.
        assert_eq!(code(&rsa, &es(&claims)), "invalid_token");
        assert_eq!(
            code(&ec, &rs(&claims, "rs256-private.pem", None)),
            "invalid_token"
        );
        let public_pem = std::fs::read(fixture("rs256-public.pem")).unwrap();
        let confused = sign_with(
            jsonwebtoken::Algorithm::HS256,
            None,
            &claims,
            &EncodingKey::from_secret(&public_pem),
        );
        assert_eq!(code(&rsa, &confused), "invalid_token");
        assert_eq!(code(&rsa, &hs(&claims)), "invalid_token");
        let message = rsa.verify(&confused).unwrap_err().to_string();
        assert!(message.contains("RS256"), "{message}");
        assert!(!message.contains(&confused));
    }

    #[test]
    fn a_jwks_file_picks_the_key_by_kid() {
        let path = jwks_file(vec![
            jwk("rs256-private.pem", jsonwebtoken::Algorithm::RS256, "one"),
            jwk(
                "rs256-other-private.pem",
                jsonwebtoken::Algorithm::RS256,
                "two",
            ),
            // Keys for other algorithms are ignored, never used with RS256.
            jwk("es256-private.pem", jsonwebtoken::Algorithm::ES256, "ec"),
            json!({"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA", "kid": "hmac"}),
        ]);
        let verifier =
            Verifier::load(&with_key(Algorithm::Rs256, KeySource::JwksFile(path))).unwrap();
        let claims = claims();
        assert_eq!(
            code(&verifier, &rs(&claims, "rs256-private.pem", Some("one"))),
            "ok"
        );
        assert_eq!(
            code(
                &verifier,
                &rs(&claims, "rs256-other-private.pem", Some("two"))
            ),
            "ok"
        );
        assert_eq!(
            code(&verifier, &rs(&claims, "rs256-private.pem", Some("two"))),
            "invalid_signature"
        );
        assert_eq!(
            code(&verifier, &rs(&claims, "rs256-private.pem", Some("three"))),
            "invalid_token"
        );
        assert_eq!(
            code(&verifier, &rs(&claims, "rs256-private.pem", None)),
            "invalid_token"
        );
        assert_eq!(code(&verifier, &es(&claims)), "invalid_token");

        let single = jwks_file(vec![jwk(
            "es256-private.pem",
            jsonwebtoken::Algorithm::ES256,
            "ec",
        )]);
        let verifier =
            Verifier::load(&with_key(Algorithm::Es256, KeySource::JwksFile(single))).unwrap();
        assert_eq!(
            code(&verifier, &es(&claims)),
            "ok",
            "one key: no kid needed"
        );
    }

    #[test]
    fn unusable_key_configurations_fail_at_start_with_the_reason() {
        let only_hmac = jwks_file(vec![json!({"kty": "oct", "k": "c2VjcmV0", "kid": "x"})]);
        let failures = [
            with_key(Algorithm::Rs256, KeySource::JwksFile(only_hmac)),
            with_key(
                Algorithm::Rs256,
                KeySource::JwksFile(fixture("rs256-public.pem")),
            ),
            with_key(
                Algorithm::Rs256,
                KeySource::PublicKeyFile(fixture("es256-public.pem")),
            ),
            with_key(
                Algorithm::Rs256,
                KeySource::PublicKeyFile(fixture("missing.pem")),
            ),
            with_key(Algorithm::Rs256, KeySource::Secret(secret())),
            with_key(
                Algorithm::Hs256,
                KeySource::PublicKeyFile(fixture("rs256-public.pem")),
            ),
        ];
        for config in failures {
            let err = Verifier::load(&config).expect_err(&format!("{config:?}"));
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let verifier = Verifier::load(&TokenConfig {
            audience: Some("clinic-relay".into()),
            issuer: Some("https://auth.example".into()),
            ..TokenConfig::hs256(secret())
        })
        .unwrap();
        let mut claims = claims();
        assert_eq!(
            code(&verifier, &hs(&claims)),
            "invalid_token",
            "no aud, no iss"
        );
        claims["aud"] = json!("clinic-relay");
        claims["iss"] = json!("https://auth.example");
        assert_eq!(code(&verifier, &hs(&claims)), "ok");
        claims["aud"] = json!(["other", "clinic-relay"]);
        assert_eq!(
            code(&verifier, &hs(&claims)),
            "ok",
            "one of several audiences"
        );
        claims["aud"] = json!("other");
        assert_eq!(code(&verifier, &hs(&claims)), "invalid_token");
        claims["aud"] = json!("clinic-relay");
        claims["iss"] = json!("https://evil.example");
        assert_eq!(code(&verifier, &hs(&claims)), "invalid_token");
        // Without configuration, aud and iss are not checked.
        assert_eq!(code(&hs256(), &hs(&claims)), "ok");
    }

    #[test]
    fn secrets_and_tokens_are_never_printed() {
        assert!(Secret::new("short").is_err());
        let secret = Secret::new("s".repeat(40)).unwrap();
        assert!(!format!("{secret:?}").contains("sss"));
        let token = RawToken("eyJsecret.token.value".into());
        assert!(!format!("{token:?}").contains("eyJ"));
    }

    #[test]
    fn algorithms_parse() {
        for alg in [Algorithm::Hs256, Algorithm::Rs256, Algorithm::Es256] {
            assert_eq!(alg.as_str().parse(), Ok(alg));
        }
        for bad in ["none", "hs256", "HS512", "PS256", ""] {
            assert!(bad.parse::<Algorithm>().is_err(), "{bad}");
        }
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
