//! The identity routes of SPEC §5: `POST /api/v1/auth/register`, `POST /api/v1/auth/token`,
//! `POST /api/v1/auth/refresh` (all public) and `PUT /api/v1/admin/users/{customer_id}/roles`
//! (admin; an empty role list disables the user). Passwords, tokens and names are never logged.

use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::{ConnectInfo, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infra::auth::{Caller, Role};
use infra::http::ApiJson;
use secrecy::{ExposeSecret, SecretString};
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

/// Validates first (400s cost nothing), then counts the registration against the address's
/// limit, refuses a taken name before hashing (409 costs no argon2 work), and hashes within the
/// bounded queue (503 when saturated).
pub async fn register(State(state): State<AppState>, request: Request) -> Result<Response> {
    let client_address = client_address(&state, &request);
    let ApiJson(body) = ApiJson::<RegisterBody>::from_request(request, &state).await?;
    let password = SecretString::from(body.password);
    identity::validate_username(&body.username)
        .map_err(|detail| Error::bad_request("invalid_username", detail))?;
    identity::validate_password(&password)
        .map_err(|detail| Error::bad_request("invalid_password", detail))?;
    if let Some(name) = &body.name {
        identity::validate_name(name)
            .map_err(|detail| Error::bad_request("invalid_name", detail))?;
    }
    state
        .limiter
        .begin_registration(client_address)
        .inspect_err(|_| tracing::warn!("registration refused: too many from this address"))?;
    if state.identities.username_taken(&body.username).await? {
        return Err(Error::UsernameTaken);
    }
    let hash = state.passwords.hash(password).await?;
    let user = state
        .identities
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

/// `POST /api/v1/auth/refresh`. No `Debug`: it holds a credential.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    refresh_token: String,
}

/// The answer of a login and of a refresh.
#[derive(Serialize)]
struct IssuedToken {
    access_token: String,
    token_type: &'static str,
    /// Seconds the access token is valid.
    expires_in: i64,
    refresh_token: String,
    /// Seconds the session (the refresh token) is valid.
    refresh_expires_in: i64,
}

/// Validates the username first (a malformed one is never stored by the limiter), checks the
/// limits (429 costs no hashing), then the password, the same way for an unknown username and
/// a wrong password; then opens a session.
pub async fn token(State(state): State<AppState>, request: Request) -> Result<Response> {
    let client_address = client_address(&state, &request);
    let ApiJson(body) = ApiJson::<TokenBody>::from_request(request, &state).await?;
    let password = SecretString::from(body.password);
    let plausible = identity::validate_username(&body.username).is_ok()
        && identity::validate_password(&password).is_ok();
    let username = plausible.then_some(body.username.as_str());
    state
        .limiter
        .begin_login(username, client_address)
        .inspect_err(|refusal| tracing::warn!(?refusal, "login refused by the limiter"))?;
    let Some(username) = username else {
        // A malformed username or a password of the wrong length matches no account: refused
        // without hashing (its length is visible to the caller anyway).
        tracing::info!("login failed");
        return Err(Error::InvalidCredentials);
    };
    let credentials = state.identities.credentials(username).await?;
    let stored = credentials
        .as_ref()
        .map(|found| found.password_hash.clone());
    let verified = match state.passwords.verify(password, stored).await {
        Ok(verified) => verified,
        Err(error) => {
            // Nothing was checked: the attempt is no failure of the username's.
            state.limiter.login_abandoned(username, client_address);
            return Err(error);
        }
    };
    let Some(credentials) = credentials.filter(|_| verified) else {
        tracing::info!("login failed");
        return Err(Error::InvalidCredentials);
    };
    state.limiter.login_succeeded(username, client_address);
    if credentials.roles.is_empty() {
        tracing::info!(customer_id = %credentials.customer_id, "login of a disabled user refused");
        return Err(Error::UserDisabled);
    }
    let session = state
        .identities
        .open_session(credentials.customer_id, state.session_lifetime)
        .await?;
    tracing::info!(customer_id = %credentials.customer_id, "token issued");
    issue(
        &state,
        credentials.customer_id,
        &credentials.roles,
        session.refresh_token,
        i64::try_from(session.expires_in.as_secs()).unwrap_or(i64::MAX),
    )
}

/// Renews an access token from a refresh token, with the user's roles as they are now: this is
/// how a role change (or a disabled user) reaches every client within an access token's life.
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Response> {
    let refresh_token = SecretString::from(body.refresh_token);
    if refresh_token.expose_secret().len() > REFRESH_TOKEN_CHARS_MAX {
        return Err(Error::InvalidRefreshToken);
    }
    let Some(session) = state.identities.refresh(&refresh_token).await? else {
        tracing::info!("refresh refused: no such session");
        return Err(Error::InvalidRefreshToken);
    };
    if session.roles.is_empty() {
        state.identities.end_session(&refresh_token).await?;
        tracing::info!(customer_id = %session.customer_id, "refresh of a disabled user refused");
        return Err(Error::UserDisabled);
    }
    tracing::info!(customer_id = %session.customer_id, "token refreshed");
    issue(
        &state,
        session.customer_id,
        &session.roles,
        refresh_token,
        session.expires_in_seconds,
    )
}

/// Longest refresh token looked up: ours are 64 hex characters; anything much longer is not one.
const REFRESH_TOKEN_CHARS_MAX: usize = 256;

fn issue(
    state: &AppState,
    customer_id: Uuid,
    roles: &[Role],
    refresh_token: SecretString,
    refresh_expires_in: i64,
) -> Result<Response> {
    let access_token = state.signer.mint(
        customer_id,
        roles,
        chrono::Utc::now().timestamp(),
        state.access_token_ttl_seconds,
    )?;
    let mut response = Json(IssuedToken {
        access_token,
        token_type: "Bearer",
        expires_in: state.access_token_ttl_seconds,
        refresh_token: refresh_token.expose_secret().to_owned(),
        refresh_expires_in,
    })
    .into_response();
    // Credentials: no cache along the way may keep them (RFC 6749 §5.1).
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// The client's address: the socket peer, or what a trusted proxy says (`crate::clients`).
fn client_address(state: &AppState, request: &Request) -> IpAddr {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(address)| {
            address.ip()
        });
    state
        .trusted_proxies
        .client_address(peer, request.headers())
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
                format!("unknown role {name:?}; roles are {}", Role::list()),
            )
        })?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    let user = state
        .identities
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
