//! JWT verification and signing (SPEC §5): HS256 pinned; `exp`, `iat`, `nbf`, `sub`, `iss` and
//! `aud` required; `iss` and `aud` checked against `JWT_ISSUER` and `JWT_AUDIENCE`; at most
//! [`CLOCK_LEEWAY_SECONDS`] of leeway. Every service verifies tokens itself, so a request that
//! bypasses the gateway is still refused.
//!
//! [`Caller`] is an axum extractor: a handler that takes one answers 401 (with
//! `WWW-Authenticate`) to a missing, malformed, expired, not-yet-valid, wrongly signed,
//! wrongly issued, `alg:none` or other-algorithm token before it runs. The 401 never says which
//! check failed (that would coach a forger); the log line does.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::problem::Problem;

/// Leeway for `exp`, `nbf` and `iat` against clock skew between the gateway and the services:
/// 15 s. Servers kept by NTP differ by milliseconds; the leeway also lengthens every token's
/// life, and an access token must lose its roles within 60 s of a role change (SPEC §5), so
/// it stays small: the gateway's access tokens live at most 60 s minus this.
pub const CLOCK_LEEWAY_SECONDS: u64 = 15;

/// Longest access token lifetime that keeps a role change effective within 60 s everywhere
/// (SPEC §5): the lifetime plus the verifiers' leeway.
pub const ACCESS_TOKEN_TTL_SECONDS_MAX: u64 = 60 - CLOCK_LEEWAY_SECONDS;

/// Shortest accepted `JWT_SECRET`, in bytes: HS256 wants a key at least as long as its hash.
pub const JWT_SECRET_BYTES_MIN: usize = 32;

/// Fewest distinct byte values in `JWT_SECRET`: a secret of 32 `a`s or `0123456789` repeated
/// is long and guessable. Random hex (16 symbols) and base64 pass; typed phrases of 32
/// characters usually do too.
pub const JWT_SECRET_DISTINCT_BYTES_MIN: usize = 16;

/// Longest accepted `JWT_ISSUER` or `JWT_AUDIENCE`.
const CLAIM_TEXT_BYTES_MAX: usize = 128;

/// A role of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Owns accounts: opens them, moves money out of them, reads them.
    Customer,
    /// The payment rail's service identity: deposits and withdrawals on any account, and reads
    /// accounts and transactions to see their outcomes; nothing else.
    Operator,
    /// Everything.
    Admin,
    /// Reads everything, changes nothing.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Customer, Role::Operator, Role::Admin, Role::Auditor];

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == text)
    }

    /// The name in tokens, the API and the gateway's `users` table.
    pub fn name(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }

    /// `customer, operator, admin, auditor`, for messages.
    pub fn list() -> String {
        Role::ALL.map(Role::name).join(", ")
    }
}

/// The token settings every verifier and signer shares (flattened into each `Config`).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenConfig {
    /// HS256 secret shared by the gateway and every service: at least 32 bytes, of at least 16
    /// distinct values.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = SecretParser)]
    pub jwt_secret: SecretString,

    /// The `iss` claim tokens carry and verifiers require.
    #[arg(long, env = "JWT_ISSUER", default_value = "ledger", value_parser = parse_claim_text)]
    pub jwt_issuer: String,

    /// The `aud` claim tokens carry and verifiers require.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "ledger-api", value_parser = parse_claim_text)]
    pub jwt_audience: String,
}

impl TokenConfig {
    /// The settings with the default issuer and audience.
    pub fn with_secret(secret: &str) -> Self {
        TokenConfig {
            jwt_secret: SecretString::from(secret.to_owned()),
            jwt_issuer: "ledger".to_owned(),
            jwt_audience: "ledger-api".to_owned(),
        }
    }

    /// As it may be logged: no secret.
    pub fn describe(&self) -> String {
        format!(
            "jwt_issuer={} jwt_audience={}",
            self.jwt_issuer, self.jwt_audience
        )
    }
}

/// The claims of a ledger token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Role names; names this version does not know are ignored rather than refused.
    #[serde(default)]
    pub roles: Vec<String>,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

/// The verified identity behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The customer id (the accounts' `owner_id`).
    pub subject: Uuid,
    pub roles: Vec<Role>,
    /// The token's id, for the audit trail.
    pub token_id: String,
}

impl Caller {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn has_any(&self, roles: &[Role]) -> bool {
        roles.iter().any(|role| self.has(*role))
    }

    /// A 403 unless the caller has one of `roles`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), Problem> {
        if self.has_any(roles) {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "your roles do not allow this operation",
            ))
        }
    }
}

/// How much a verifier remembers of the tokens it verified, in bytes as [`remembered_bytes`]
/// counts them: 8 MiB, about 13,000 of our tokens. A client sends the same access token with
/// every request for its lifetime (at most a minute), so this covers thousands of active
/// clients; past it, the least used are verified again.
const VERIFIED_TOKENS_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// What an entry holds besides its token's text and id (the caller's subject and roles, the
/// window, the cache's own bookkeeping), as [`remembered_bytes`] counts it: an estimate.
const VERIFIED_ENTRY_OVERHEAD_BYTES: usize = 256;

/// How long a verified token is remembered after it was last presented, if it does not expire
/// first: a client that stopped sending it frees its place within a minute.
const VERIFIED_TOKEN_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest a verified token is remembered, whatever its `exp` says (`ledger token` can mint
/// long-lived ones): an hour, after which it is verified in full again.
const VERIFIED_TOKEN_REMEMBERED_SECONDS_MAX: i64 = 3600;

/// Longest token a verifier remembers: a ledger token is about 350 bytes. Longer ones are
/// verified every time.
const VERIFIED_TOKEN_BYTES_MAX: usize = 1024;

/// Verifies tokens with the shared secret, issuer and audience.
///
/// A token it has verified is remembered, keyed by its whole text, with the caller it names
/// and its validity window: the next request that presents the same token skips the
/// signature, the decoding and the claims checks (a tenth of the projector's CPU on a cached
/// `GET`), and only the time checks run again. Only tokens that passed every check are
/// remembered, until their `exp` (with the leeway); any other text, however close to one that
/// did, is verified in full (docs/decisions.md §75).
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    verified: moka::sync::Cache<String, Arc<Verified>>,
}

/// What a verified token established: who it names, and when it may be used.
struct Verified {
    caller: Caller,
    not_before: i64,
    expires: i64,
}

impl Verified {
    /// Whether the token may be used at `now` (unix seconds): the checks `jsonwebtoken` makes,
    /// with the same leeway.
    fn valid_at(&self, now: i64) -> bool {
        self.expires >= now.saturating_sub(leeway())
            && self.not_before <= now.saturating_add(leeway())
    }
}

/// [`CLOCK_LEEWAY_SECONDS`] as a timestamp difference.
fn leeway() -> i64 {
    i64::try_from(CLOCK_LEEWAY_SECONDS).unwrap_or(i64::MAX)
}

/// Now, in unix seconds, from the clock `jsonwebtoken` reads.
fn unix_now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX)
}

/// The weight of a remembered token against [`VERIFIED_TOKENS_BYTES_MAX`].
fn remembered_bytes(token: &str, verified: &Verified) -> u32 {
    let bytes = token.len() + verified.caller.token_id.len() + VERIFIED_ENTRY_OVERHEAD_BYTES;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Forgets a remembered token the second after it expires (leeway included), or after
/// [`VERIFIED_TOKEN_REMEMBERED_SECONDS_MAX`].
struct UntilExpired;

impl moka::Expiry<String, Arc<Verified>> for UntilExpired {
    fn expire_after_create(
        &self,
        _token: &String,
        verified: &Arc<Verified>,
        _created_at: std::time::Instant,
    ) -> Option<std::time::Duration> {
        let left = verified
            .expires
            .saturating_add(leeway())
            .saturating_sub(unix_now())
            .saturating_add(1)
            .clamp(0, VERIFIED_TOKEN_REMEMBERED_SECONDS_MAX);
        Some(std::time::Duration::from_secs(left.unsigned_abs()))
    }
}

impl JwtVerifier {
    pub fn new(config: &TokenConfig) -> Result<Self> {
        check_secret(&config.jwt_secret)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&config.jwt_issuer]);
        validation.set_audience(&[&config.jwt_audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "sub", "iss", "aud"]);
        Ok(JwtVerifier {
            key: DecodingKey::from_secret(config.jwt_secret.expose_secret().as_bytes()),
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKENS_BYTES_MAX)
                .weigher(|token: &String, verified: &Arc<Verified>| {
                    remembered_bytes(token, verified)
                })
                .expire_after(UntilExpired)
                .time_to_idle(VERIFIED_TOKEN_IDLE)
                .build(),
        })
    }

    /// Verifies a bearer token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some(known) = self.verified.get(token) {
            if known.valid_at(unix_now()) {
                return Ok(known.caller.clone());
            }
            // Expired since: forgotten, and refused below with the library's reason.
            self.verified.invalidate(token);
        }
        let verified = self.verify_in_full(token)?;
        let caller = verified.caller.clone();
        if token.len() <= VERIFIED_TOKEN_BYTES_MAX {
            self.verified.insert(token.to_owned(), Arc::new(verified));
        }
        Ok(caller)
    }

    /// Every check, on a token not seen before.
    fn verify_in_full(&self, token: &str) -> Result<Verified, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| AuthError::InvalidToken(error.to_string()))?;
        let claims = data.claims;
        let subject = Uuid::parse_str(&claims.sub)
            .map_err(|_| AuthError::InvalidToken("sub is not a customer id".into()))?;
        let roles: BTreeSet<Role> = claims
            .roles
            .iter()
            .filter_map(|name| Role::parse(name))
            .collect();
        Ok(Verified {
            caller: Caller {
                subject,
                roles: roles.into_iter().collect(),
                token_id: claims.jti,
            },
            not_before: claims.nbf,
            expires: claims.exp,
        })
    }
}

/// Mints tokens: the gateway's job, also used by `ledger token` and the tests.
pub struct JwtSigner {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

impl JwtSigner {
    pub fn new(config: &TokenConfig) -> Result<Self> {
        check_secret(&config.jwt_secret)?;
        Ok(JwtSigner {
            key: EncodingKey::from_secret(config.jwt_secret.expose_secret().as_bytes()),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        })
    }

    /// A token for `subject` with `roles`, valid for `ttl_seconds` from `now` (unix seconds).
    pub fn mint(
        &self,
        subject: Uuid,
        roles: &[Role],
        now: i64,
        ttl_seconds: i64,
    ) -> Result<String> {
        let claims = Claims {
            sub: subject.to_string(),
            roles: roles.iter().map(|role| role.name().to_owned()).collect(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl_seconds),
            jti: Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|error| Error::Config(format!("cannot sign a token: {error}")))
    }
}

/// Parses `JWT_SECRET` for clap like [`parse_secret`], but with an error that never quotes the
/// value: clap's own message for a refused value does (`invalid value '<the secret>'`), and a
/// service's start-up error ends up in logs.
#[derive(Debug, Clone, Copy)]
pub struct SecretParser;

impl clap::builder::TypedValueParser for SecretParser {
    type Value = SecretString;

    fn parse_ref(
        &self,
        command: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<SecretString, clap::Error> {
        let refuse = |problem: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("JWT_SECRET (--jwt-secret) {problem}\n"),
            )
            .with_cmd(command)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("must be UTF-8".to_owned()))?;
        parse_secret(text).map_err(refuse)
    }
}

/// Parses `JWT_SECRET` for a clap `value_parser`: at least [`JWT_SECRET_BYTES_MIN`] bytes of at
/// least [`JWT_SECRET_DISTINCT_BYTES_MIN`] distinct values.
pub fn parse_secret(text: &str) -> Result<SecretString, String> {
    secret_problem(text).map_or_else(|| Ok(SecretString::from(text.to_owned())), Err)
}

fn secret_problem(text: &str) -> Option<String> {
    let distinct: BTreeSet<u8> = text.bytes().collect();
    if text.len() < JWT_SECRET_BYTES_MIN {
        Some(format!(
            "must be at least {JWT_SECRET_BYTES_MIN} bytes long (e.g. openssl rand -hex 32)"
        ))
    } else if distinct.len() < JWT_SECRET_DISTINCT_BYTES_MIN {
        Some(format!(
            "must have at least {JWT_SECRET_DISTINCT_BYTES_MIN} distinct bytes; this one has {} \
             (use a random secret, e.g. openssl rand -hex 32)",
            distinct.len()
        ))
    } else {
        None
    }
}

fn check_secret(secret: &SecretString) -> Result<()> {
    match secret_problem(secret.expose_secret()) {
        Some(problem) => Err(Error::Config(format!("JWT_SECRET {problem}"))),
        None => Ok(()),
    }
}

/// Parses `JWT_ISSUER` and `JWT_AUDIENCE`: 1–128 visible ASCII characters.
pub fn parse_claim_text(text: &str) -> Result<String, String> {
    if (1..=CLAIM_TEXT_BYTES_MAX).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_graphic())
    {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "must be 1 to {CLAIM_TEXT_BYTES_MAX} visible ASCII characters"
        ))
    }
}

/// Why a request is not authenticated. The message is for the logs; the 401 says less.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    NotBearer,
    #[error("invalid token: {0}")]
    InvalidToken(String),
}

impl From<AuthError> for Problem {
    fn from(error: AuthError) -> Problem {
        let (challenge, detail) = match &error {
            AuthError::Missing => (r#"Bearer realm="ledger""#, "a bearer token is required"),
            _ => (
                r#"Bearer realm="ledger", error="invalid_token""#,
                "the bearer token is invalid or has expired",
            ),
        };
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )
    }
}

impl<S> FromRequestParts<S> for Caller
where
    Arc<JwtVerifier>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Arc::<JwtVerifier>::from_ref(state);
        bearer_caller(&verifier, &parts.headers).map_err(|error| {
            // Which check failed (expired, signature, issuer...) names no secret or claim value;
            // it is logged for the operator and withheld from the caller.
            tracing::info!(reason = %error, "request refused: no valid token");
            Problem::from(error)
        })
    }
}

fn bearer_caller(
    verifier: &JwtVerifier,
    headers: &axum::http::HeaderMap,
) -> Result<Caller, AuthError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let text = header.to_str().map_err(|_| AuthError::NotBearer)?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or(AuthError::NotBearer)?
        .trim();
    verifier.verify(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

    fn config() -> TokenConfig {
        TokenConfig::with_secret(SECRET)
    }

    fn sign(claims: &serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("signs")
    }

    fn claims(now: i64) -> serde_json::Value {
        serde_json::json!({
            "sub": Uuid::new_v4().to_string(), "roles": ["customer"], "iss": "ledger",
            "aud": "ledger-api", "iat": now, "nbf": now, "exp": now + 300, "jti": "j",
        })
    }

    #[test]
    fn a_minted_token_verifies_with_its_roles_issuer_and_audience() {
        // Proves a round trip: the signer sets iss, aud and nbf, and the verifier accepts them.
        let signer = JwtSigner::new(&config()).expect("a good secret");
        let verifier = JwtVerifier::new(&config()).expect("a good secret");
        let subject = Uuid::new_v4();
        let token = signer
            .mint(subject, &[Role::Operator, Role::Auditor], unix_now(), 30)
            .expect("signing works");
        let caller = verifier.verify(&token).expect("a fresh token verifies");
        assert_eq!(caller.subject, subject);
        assert_eq!(caller.roles, vec![Role::Operator, Role::Auditor]);
    }

    #[test]
    fn expired_early_wrongly_signed_and_unsigned_tokens_are_refused() {
        // Proves every token check: expiry beyond the leeway, nbf in the future, another secret,
        // alg:none.
        let signer = JwtSigner::new(&config()).expect("a good secret");
        let verifier = JwtVerifier::new(&config()).expect("a good secret");
        let subject = Uuid::new_v4();
        let expired = signer
            .mint(subject, &[Role::Customer], unix_now() - 1000, 100)
            .expect("signs");
        assert!(verifier.verify(&expired).is_err());
        let leeway = leeway();
        let recent = signer
            .mint(
                subject,
                &[Role::Customer],
                unix_now() - 100 - leeway + 5,
                100,
            )
            .expect("signs");
        assert!(
            verifier.verify(&recent).is_ok(),
            "expired within the leeway"
        );
        let mut early = claims(unix_now());
        early["nbf"] = serde_json::json!(unix_now() + 3600);
        assert!(
            verifier.verify(&sign(&early, SECRET)).is_err(),
            "nbf in the future"
        );
        let forged = sign(
            &claims(unix_now()),
            "another-secret-that-is-long-enough-too!!",
        );
        assert!(verifier.verify(&forged).is_err());
        let payload = forged.split('.').nth(1).expect("a JWT has three parts");
        let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(verifier.verify(&unsigned).is_err());
        assert!(verifier.verify("not-a-token").is_err());
    }

    fn remembered(subject: Uuid, not_before: i64, expires: i64) -> Arc<Verified> {
        Arc::new(Verified {
            caller: Caller {
                subject,
                roles: vec![Role::Customer],
                token_id: "j".to_owned(),
            },
            not_before,
            expires,
        })
    }

    #[test]
    fn a_remembered_token_s_time_checks_are_the_library_s() {
        // Proves `valid_at` draws the lines `jsonwebtoken` draws: `exp` and `nbf` each pass
        // within the leeway and fail one second past it.
        let now = 1_900_000_000;
        let leeway = leeway();
        let window = |not_before, expires| remembered(Uuid::nil(), not_before, expires);
        assert!(
            window(now, now - leeway).valid_at(now),
            "exp within the leeway"
        );
        assert!(!window(now, now - leeway - 1).valid_at(now), "exp past it");
        assert!(
            window(now + leeway, now + 60).valid_at(now),
            "nbf within it"
        );
        assert!(
            !window(now + leeway + 1, now + 60).valid_at(now),
            "nbf past it"
        );
    }

    #[test]
    fn a_remembered_token_leaves_memory_the_second_after_it_expires_or_within_an_hour() {
        // Proves the memory is freed on time: the expiry policy gives each token until its
        // `exp` plus the leeway (and a second), at most an hour, and nothing to an expired one.
        let now = unix_now();
        let left = |expires| {
            moka::Expiry::expire_after_create(
                &UntilExpired,
                &String::new(),
                &remembered(Uuid::nil(), now, expires),
                std::time::Instant::now(),
            )
            .expect("always an expiry")
            .as_secs()
        };
        let expected = u64::try_from(30 + leeway() + 1).expect("positive");
        // The clock may tick between `now` and the policy's own reading.
        assert!((expected - 1..=expected).contains(&left(now + 30)));
        assert_eq!(left(now + 86_400), 3600, "at most an hour");
        assert_eq!(left(now - leeway() - 60), 0, "expired: nothing");
    }

    #[test]
    fn a_remembered_token_is_answered_from_memory_only_while_its_time_is_valid() {
        // Proves a hit is served from memory (a text that full verification refuses is
        // answered with the caller remembered for it), and that a remembered token is refused
        // and forgotten once its `exp` or before its `nbf`, with the leeway.
        let verifier = JwtVerifier::new(&config()).expect("a good secret");
        let subject = Uuid::new_v4();
        let now = unix_now();
        let text = "not.a.token".to_owned();
        verifier
            .verified
            .insert(text.clone(), remembered(subject, now, now + 60));
        let caller = verifier.verify(&text).expect("answered from memory");
        assert_eq!(caller.subject, subject);

        for (not_before, expires, why) in [
            (now - 60, now - leeway() - 1, "expired"),
            (now + leeway() + 1, now + 60, "not yet valid"),
        ] {
            verifier
                .verified
                .insert(text.clone(), remembered(subject, not_before, expires));
            assert!(verifier.verify(&text).is_err(), "{why}, though remembered");
            assert!(!verifier.verified.contains_key(&text), "{why}: forgotten");
        }
    }

    #[test]
    fn only_a_token_that_passed_every_check_is_remembered_and_only_as_it_is() {
        // Proves a remembered token vouches for no other text: its signature or its claims
        // changed by one character are verified in full and refused; refused tokens and
        // overlong ones are not remembered.
        let signer = JwtSigner::new(&config()).expect("a good secret");
        let verifier = JwtVerifier::new(&config()).expect("a good secret");
        let token = signer
            .mint(Uuid::new_v4(), &[Role::Customer], unix_now(), 30)
            .expect("signs");
        assert!(verifier.verify(&token).is_ok());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        // A character in the middle: the last one of a base64 text may carry only padding
        // bits, and base64 decoding, not the HMAC, would refuse it.
        let flip = |text: &str| {
            let mut bytes = text.as_bytes().to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
            String::from_utf8(bytes).expect("ASCII")
        };
        let signature = parts[2].clone();
        parts[2] = flip(&signature);
        let bad_signature = parts.join(".");
        parts[2] = signature;
        let mut payload: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &parts[1])
                .expect("base64url"),
        )
        .expect("JSON claims");
        payload["roles"] = serde_json::json!(["admin"]);
        parts[1] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            payload.to_string(),
        );
        let promoted = parts.join(".");
        for forged in [&bad_signature, &promoted] {
            assert!(verifier.verify(forged).is_err(), "{forged}");
            assert!(!verifier.verified.contains_key(forged.as_str()));
        }
        assert!(
            verifier.verify(&token).is_ok(),
            "the real one still verifies"
        );

        let mut long = claims(unix_now());
        long["jti"] = serde_json::json!("j".repeat(VERIFIED_TOKEN_BYTES_MAX));
        let long = sign(&long, SECRET);
        assert!(verifier.verify(&long).is_ok(), "verified");
        assert!(!verifier.verified.contains_key(&long), "but not remembered");
    }

    #[test]
    fn the_issuer_and_the_audience_are_required_and_checked() {
        // Proves iss and aud are checked: missing, or naming another issuer or audience, is 401.
        let verifier = JwtVerifier::new(&config()).expect("a good secret");
        assert!(verifier.verify(&sign(&claims(unix_now()), SECRET)).is_ok());
        for (field, value) in [("iss", "someone-else"), ("aud", "another-api")] {
            let mut wrong = claims(unix_now());
            wrong[field] = serde_json::json!(value);
            assert!(verifier.verify(&sign(&wrong, SECRET)).is_err(), "{field}");
        }
        for field in ["iss", "aud", "nbf"] {
            let mut missing = claims(unix_now());
            missing.as_object_mut().expect("an object").remove(field);
            assert!(verifier.verify(&sign(&missing, SECRET)).is_err(), "{field}");
        }
    }

    #[test]
    fn the_401_does_not_say_which_check_failed() {
        // Proves the answer is generic: the verifier's reason stays in the logs.
        let problem = Problem::from(AuthError::InvalidToken("InvalidSignature".to_owned()));
        assert_eq!(problem.status, StatusCode::UNAUTHORIZED);
        assert!(!problem.detail.contains("Signature"), "{}", problem.detail);
    }

    #[test]
    fn short_and_repetitive_secrets_are_a_configuration_error() {
        // Proves JWT_SECRET's two rules: 32 bytes, 16 distinct byte values.
        for bad in ["short", &"a".repeat(64), &"0123456789".repeat(4)] {
            assert!(parse_secret(bad).is_err(), "{bad}");
            assert!(
                JwtVerifier::new(&TokenConfig::with_secret(bad)).is_err(),
                "{bad}"
            );
        }
        assert!(parse_secret(SECRET).is_ok());
        // Through clap, a refused secret is never quoted.
        let weak = "0123456789abcde0123456789abcde0123456789";
        let error = <TokenConfig as clap::Args>::augment_args(clap::Command::new("service"))
            .try_get_matches_from(["service", "--jwt-secret", weak])
            .expect_err("refused");
        assert!(error.to_string().contains("distinct"), "{error}");
        assert!(!error.to_string().contains(weak), "{error}");
        assert!(parse_secret(&"0123456789abcdef".repeat(2)).is_ok(), "hex");
    }

    #[test]
    fn every_role_parses_from_its_name() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
