//! The secrets of `ledger serve` (SPEC §10): `JWT_SECRET`, `ADMIN_USERNAME`, `ADMIN_PASSWORD`.
//!
//! Each comes from the environment when it is set; otherwise from `DIR/secrets.json`, which the
//! first start creates with generated values (mode 0600, written to a temporary file and
//! renamed, so a crash never leaves half a file). Generated values are printed once, on that
//! first start, with how to log in; later starts only say where they are. A secrets file that
//! others can read is refused, as ssh refuses a private key: a secret that leaked is not one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::data_dir::io_error;
use crate::error::{Error, Result};

/// The secrets file's name in DIR.
const SECRETS_FILE: &str = "secrets.json";

/// The bootstrap admin's name when none is given.
const DEFAULT_ADMIN_USERNAME: &str = "admin";

/// Characters of a generated JWT secret: 64 alphanumerics, about 380 bits.
const JWT_SECRET_CHARS: usize = 64;

/// Characters of a generated admin password: 24 alphanumerics, about 140 bits.
const ADMIN_PASSWORD_CHARS: usize = 24;

/// What DIR keeps.
#[derive(Serialize, Deserialize)]
struct Stored {
    jwt_secret: String,
    admin_username: String,
    admin_password: String,
}

/// The secrets `serve` runs with.
pub struct Secrets {
    pub jwt_secret: SecretString,
    pub admin_username: String,
    pub admin_password: SecretString,
    /// Where they are kept.
    pub file: PathBuf,
    /// Whether this start generated the file (its values are then printed once).
    pub generated: bool,
    /// Whether the password came from `ADMIN_PASSWORD` (then it is never printed: its owner
    /// knows it).
    pub password_from_environment: bool,
}

/// What the environment says (each `None` when unset or empty).
#[derive(Default)]
pub struct FromEnvironment {
    pub jwt_secret: Option<SecretString>,
    pub admin_username: Option<String>,
    pub admin_password: Option<SecretString>,
}

impl FromEnvironment {
    pub fn read() -> FromEnvironment {
        let get = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        FromEnvironment {
            jwt_secret: get("JWT_SECRET").map(SecretString::from),
            admin_username: get("ADMIN_USERNAME"),
            admin_password: get("ADMIN_PASSWORD").map(SecretString::from),
        }
    }
}

/// The secrets for DIR: the environment's where set, DIR's otherwise, generated when DIR has
/// none yet.
pub fn load_or_create(dir: &Path, environment: FromEnvironment) -> Result<Secrets> {
    let file = dir.join(SECRETS_FILE);
    let (stored, generated) = if file.exists() {
        (read(&file)?, false)
    } else {
        let stored = Stored {
            jwt_secret: random_text(JWT_SECRET_CHARS),
            admin_username: DEFAULT_ADMIN_USERNAME.to_owned(),
            admin_password: random_text(ADMIN_PASSWORD_CHARS),
        };
        write(&file, &stored)?;
        (stored, true)
    };
    let password_from_environment = environment.admin_password.is_some();
    Ok(Secrets {
        password_from_environment,
        jwt_secret: environment
            .jwt_secret
            .unwrap_or_else(|| SecretString::from(stored.jwt_secret)),
        admin_username: environment.admin_username.unwrap_or(stored.admin_username),
        admin_password: environment
            .admin_password
            .unwrap_or_else(|| SecretString::from(stored.admin_password)),
        file,
        generated,
    })
}

impl Secrets {
    /// What to print at start: the credentials once, when they were just generated; where they
    /// are, otherwise. The JWT secret is never printed (it stays in the file).
    pub fn announcement(&self, base_url: &str) -> String {
        if self.generated && self.password_from_environment {
            format!(
                "First start: generated a JWT secret, kept in {} (mode 0600); the admin is {} \
                 with the password in ADMIN_PASSWORD.",
                self.file.display(),
                self.admin_username
            )
        } else if self.generated {
            format!(
                "First start: generated the admin's credentials and a JWT secret, kept in {file} \
                 (mode 0600).\n  admin username: {user}\n  admin password: {password}\nLog in:\n  \
                 curl -s {base_url}/api/v1/auth/token -H 'content-type: application/json' \\\n    \
                 -d '{{\"username\":\"{user}\",\"password\":\"{password}\"}}'\n\
                 (ADMIN_USERNAME, ADMIN_PASSWORD and JWT_SECRET in the environment take precedence.)",
                file = self.file.display(),
                user = self.admin_username,
                password = self.admin_password.expose_secret(),
            )
        } else {
            format!(
                "The admin's credentials are in {} unless ADMIN_USERNAME and ADMIN_PASSWORD are set.",
                self.file.display()
            )
        }
    }
}

fn random_text(chars: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(chars)
        .map(char::from)
        .collect()
}

fn read(file: &Path) -> Result<Stored> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(file)
            .map_err(|error| io_error(file, "cannot read", &error))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Usage(format!(
                "{} is readable by others (mode {:o}); it holds the JWT secret and the admin's \
                 password. Run `chmod 600 {}` and start again.",
                file.display(),
                mode & 0o777,
                file.display()
            )));
        }
    }
    let text = fs::read_to_string(file).map_err(|error| io_error(file, "cannot read", &error))?;
    serde_json::from_str(&text).map_err(|error| {
        Error::Usage(format!(
            "{} is not a secrets file this version understands: {error}",
            file.display()
        ))
    })
}

fn write(file: &Path, stored: &Stored) -> Result<()> {
    let text = serde_json::to_string_pretty(stored)
        .map_err(|error| Error::Usage(format!("cannot encode the secrets: {error}")))?;
    let temporary = file.with_extension("json.tmp");
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut out = options
        .open(&temporary)
        .map_err(|error| io_error(&temporary, "cannot create", &error))?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|error| io_error(&temporary, "cannot write", &error))?;
    fs::rename(&temporary, file).map_err(|error| io_error(file, "cannot create", &error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_start_generates_and_keeps_them_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(dir.path(), FromEnvironment::default()).expect("first");
        assert!(first.generated);
        assert_eq!(first.admin_username, "admin");
        assert!(infra::auth::parse_secret(first.jwt_secret.expose_secret()).is_ok());
        assert!(first.admin_password.expose_secret().len() >= 12);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&first.file)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let announced = first.announcement("http://127.0.0.1:8080");
        assert!(announced.contains(first.admin_password.expose_secret()));
        assert!(!announced.contains(first.jwt_secret.expose_secret()));

        // A restart reads the same ones and does not print the password again.
        let second = load_or_create(dir.path(), FromEnvironment::default()).expect("second");
        assert!(!second.generated);
        assert_eq!(
            second.jwt_secret.expose_secret(),
            first.jwt_secret.expose_secret()
        );
        assert_eq!(
            second.admin_password.expose_secret(),
            first.admin_password.expose_secret()
        );
        assert!(
            !second
                .announcement("http://x")
                .contains(first.admin_password.expose_secret())
        );
    }

    #[test]
    fn the_environment_wins_over_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create(dir.path(), FromEnvironment::default()).expect("first");
        let secrets = load_or_create(
            dir.path(),
            FromEnvironment {
                jwt_secret: Some(SecretString::from("s".repeat(3))),
                admin_username: Some("root-user".to_owned()),
                admin_password: None,
            },
        )
        .expect("second");
        assert_eq!(secrets.jwt_secret.expose_secret(), "sss");
        assert_eq!(secrets.admin_username, "root-user");
        assert!(secrets.admin_password.expose_secret().len() >= 12);
    }

    #[test]
    fn a_password_from_the_environment_is_never_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = load_or_create(
            dir.path(),
            FromEnvironment {
                admin_password: Some(SecretString::from("from-the-environment-1")),
                ..FromEnvironment::default()
            },
        )
        .expect("first");
        assert!(secrets.generated);
        let announced = secrets.announcement("http://x");
        assert!(!announced.contains("from-the-environment-1"), "{announced}");
        assert!(announced.contains("ADMIN_PASSWORD"), "{announced}");
    }

    #[cfg(unix)]
    #[test]
    fn a_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = load_or_create(dir.path(), FromEnvironment::default()).expect("first");
        fs::set_permissions(&secrets.file, fs::Permissions::from_mode(0o644)).expect("chmod");
        let message = load_or_create(dir.path(), FromEnvironment::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(message.contains("chmod 600"), "{message}");
    }
}
