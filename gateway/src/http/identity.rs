//! The identity routes of SPEC §5: `POST /api/v1/auth/register`, `POST /api/v1/auth/token`
//! (both public) and `PUT /api/v1/admin/users/{customer_id}/roles` (admin). Passwords, tokens
//! and names are never logged.

use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::{ConnectInfo, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infra::auth::{Caller, Role};
use infra::http::ApiJson;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use crate::error::{Error, Result};
use crate::identity;

/// `POST /api/v1/auth/register`. No `Debug`: it holds a password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    username: String,
    password: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Serialize)]
struct Registered {
    customer_id: Uuid,
    username: String,
}

pub async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<Response> {
    let password = SecretString::from(body.password);
    identity::validate_username(&body.username)
        .map_err(|detail| Error::bad_request("invalid_username", detail))?;
    identity::validate_password(&password)
        .map_err(|detail| Error::bad_request("invalid_password", detail))?;
    if let Some(name) = &body.name {
        identity::validate_name(name)
            .map_err(|detail| Error::bad_request("invalid_name", detail))?;
    }
    let hash = state.passwords.hash(password).await?;
    let user = state
        .users
        .register(&body.username, &hash, body.name.as_deref())
        .await?;
    tracing::info!(customer_id = %user.customer_id, "customer registered");
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            customer_id: user.customer_id,
            username: user.username,
        }),
    )
        .into_response())
}

/// `POST /api/v1/auth/token`. No `Debug`: it holds a password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    username: String,
    password: String,
}

#[derive(Debug, Serialize)]
struct IssuedToken {
    access_token: String,
    token_type: &'static str,
    expires_in: i64,
}

/// Checks the limits first (429 costs no hashing), then the password, the same way for an
/// unknown username and a wrong password.
pub async fn token(State(state): State<AppState>, request: Request) -> Result<Response> {
    let client_address = client_address(&request);
    let ApiJson(body) = ApiJson::<TokenBody>::from_request(request, &state).await?;
    state
        .limiter
        .begin(&body.username, client_address)
        .map_err(|retry_after_seconds| {
            tracing::warn!(retry_after_seconds, "login refused: too many failures");
            Error::TooManyLoginFailures {
                retry_after_seconds,
            }
        })?;
    let password = SecretString::from(body.password);
    let plausible = identity::validate_username(&body.username).is_ok()
        && identity::validate_password(&password).is_ok();
    let credentials = if plausible {
        state.users.credentials(&body.username).await?
    } else {
        None
    };
    let verified = if plausible {
        let stored = credentials
            .as_ref()
            .map(|found| found.password_hash.clone());
        state.passwords.verify(password, stored).await?
    } else {
        // A malformed username or a password of the wrong length matches no account: refused
        // without hashing (its length is visible to the caller anyway).
        false
    };
    let Some(credentials) = credentials.filter(|_| verified) else {
        tracing::info!("login failed");
        return Err(Error::InvalidCredentials);
    };
    state.limiter.succeeded(&body.username, client_address);
    let access_token = state.signer.mint(
        credentials.customer_id,
        &credentials.roles,
        chrono::Utc::now().timestamp(),
        state.token_ttl_seconds,
    )?;
    tracing::info!(customer_id = %credentials.customer_id, "token issued");
    Ok(Json(IssuedToken {
        access_token,
        token_type: "Bearer",
        expires_in: state.token_ttl_seconds,
    })
    .into_response())
}

/// The socket peer's address; `X-Forwarded-For` is not trusted (docs/gateway.md).
fn client_address(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}

/// `PUT /api/v1/admin/users/{customer_id}/roles`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesBody {
    roles: Vec<String>,
}

pub async fn set_roles(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    ApiJson(body): ApiJson<RolesBody>,
) -> Result<Response> {
    caller.require_any(&[Role::Admin])?;
    let customer_id = Uuid::parse_str(&customer_id)
        .map_err(|_| Error::bad_request("invalid_customer_id", "the customer id is not a UUID"))?;
    let mut roles = Vec::new();
    for name in &body.roles {
        let role = Role::parse(name).ok_or_else(|| {
            Error::bad_request(
                "unknown_role",
                format!("unknown role {name:?}; roles are customer, admin, auditor"),
            )
        })?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    let user = state
        .users
        .set_roles(customer_id, &roles)
        .await?
        .ok_or_else(|| Error::not_found("user_not_found", "no user has this customer id"))?;
    tracing::info!(
        customer_id = %user.customer_id,
        changed_by = %caller.subject,
        roles = ?user.roles,
        "roles set"
    );
    Ok(Json(user).into_response())
}
