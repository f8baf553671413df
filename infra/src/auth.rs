//! JWT verification (SPEC §5): HS256 pinned, `exp` required, at most 60 s of leeway, claims
//! `sub` (the customer id), `roles`, `iat`, `exp`, `jti`. Every service verifies tokens itself, so
//! a request that bypasses the gateway is still refused.
//!
//! [`Caller`] is an axum extractor: a handler that takes one answers 401 (with
//! `WWW-Authenticate`) to a missing, malformed, expired, wrongly signed, `alg:none` or
//! other-algorithm token before it runs.

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

/// Leeway for `exp`, `iat` and `nbf` against clock skew between services (SPEC §5: at most 60 s).
const CLOCK_LEEWAY_SECONDS: u64 = 60;

/// Shortest accepted `JWT_SECRET`, in bytes: HS256 wants a key at least as long as its hash.
pub const JWT_SECRET_BYTES_MIN: usize = 32;

/// A role of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Admin,
    Auditor,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

/// The claims of a ledger token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Role names; names this version does not know are ignored rather than refused.
    #[serde(default)]
    pub roles: Vec<String>,
    pub iat: i64,
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

/// Verifies tokens with the shared secret.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    pub fn new(secret: &SecretString) -> Result<Self> {
        check_secret(secret)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        Ok(JwtVerifier {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            validation,
        })
    }

    /// Verifies a bearer token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| AuthError::InvalidToken(error.to_string()))?;
        let claims = data.claims;
        let subject = Uuid::parse_str(&claims.sub)
            .map_err(|_| AuthError::InvalidToken("sub is not a customer id".into()))?;
        Ok(Caller {
            subject,
            roles: claims
                .roles
                .iter()
                .filter_map(|name| Role::parse(name))
                .collect(),
            token_id: claims.jti,
        })
    }
}

/// Mints tokens: the gateway's job, also used by `ledger token` and the tests.
pub struct JwtSigner {
    key: EncodingKey,
}

impl JwtSigner {
    pub fn new(secret: &SecretString) -> Result<Self> {
        check_secret(secret)?;
        Ok(JwtSigner {
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
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
            roles: roles
                .iter()
                .map(|role| {
                    serde_json::to_value(role)
                        .ok()
                        .and_then(|value| value.as_str().map(str::to_owned))
                        .unwrap_or_default()
                })
                .collect(),
            iat: now,
            exp: now.saturating_add(ttl_seconds),
            jti: Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|error| Error::Config(format!("cannot sign a token: {error}")))
    }
}

/// Parses `JWT_SECRET` for a clap `value_parser`: at least [`JWT_SECRET_BYTES_MIN`] bytes.
pub fn parse_secret(text: &str) -> Result<SecretString, String> {
    if text.len() < JWT_SECRET_BYTES_MIN {
        return Err(format!(
            "must be at least {JWT_SECRET_BYTES_MIN} bytes long"
        ));
    }
    Ok(SecretString::from(text.to_owned()))
}

fn check_secret(secret: &SecretString) -> Result<()> {
    if secret.expose_secret().len() < JWT_SECRET_BYTES_MIN {
        return Err(Error::Config(format!(
            "JWT_SECRET must be at least {JWT_SECRET_BYTES_MIN} bytes long"
        )));
    }
    Ok(())
}

/// Why a request is not authenticated.
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
        let challenge = match &error {
            AuthError::Missing => r#"Bearer realm="ledger""#,
            _ => r#"Bearer realm="ledger", error="invalid_token""#,
        };
        // The verifier's message says which check failed (expired, signature, algorithm); it
        // names no secret and no claim value.
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string()).with_header(
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
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let text = header.to_str().map_err(|_| AuthError::NotBearer)?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?
            .trim();
        Ok(verifier.verify(token)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("a-test-secret-that-is-long-enough-for-hs256")
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn a_minted_token_verifies_with_its_roles() {
        let signer = JwtSigner::new(&secret()).expect("secret is long enough");
        let verifier = JwtVerifier::new(&secret()).expect("secret is long enough");
        let subject = Uuid::new_v4();
        let token = signer
            .mint(subject, &[Role::Customer, Role::Auditor], now(), 300)
            .expect("signing works");
        let caller = verifier.verify(&token).expect("a fresh token verifies");
        assert_eq!(caller.subject, subject);
        assert_eq!(caller.roles, vec![Role::Customer, Role::Auditor]);
    }

    #[test]
    fn expired_wrongly_signed_and_unsigned_tokens_are_refused() {
        let signer = JwtSigner::new(&secret()).expect("secret is long enough");
        let verifier = JwtVerifier::new(&secret()).expect("secret is long enough");
        let subject = Uuid::new_v4();
        // Expired beyond the 60 s leeway.
        let expired = signer
            .mint(subject, &[Role::Customer], now() - 1000, 100)
            .expect("signs");
        assert!(verifier.verify(&expired).is_err());
        // Expired within the leeway still passes.
        let recent = signer
            .mint(subject, &[Role::Customer], now() - 130, 100)
            .expect("signs");
        assert!(verifier.verify(&recent).is_ok());
        // Signed with another secret.
        let other = JwtSigner::new(&SecretString::from(
            "another-secret-that-is-long-enough-too!!",
        ))
        .expect("long enough");
        let forged = other
            .mint(subject, &[Role::Admin], now(), 100)
            .expect("signs");
        assert!(verifier.verify(&forged).is_err());
        // alg:none: the same claims, no signature.
        let payload = forged.split('.').nth(1).expect("a JWT has three parts");
        let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(verifier.verify(&unsigned).is_err());
        assert!(verifier.verify("not-a-token").is_err());
    }

    #[test]
    fn short_secrets_are_a_configuration_error() {
        assert!(JwtVerifier::new(&SecretString::from("short")).is_err());
    }
}
