//! The data directory of `ledger serve` (SPEC §10): the SQLite file that holds everything, the
//! secrets of a first try, and the lock that makes one `serve` per directory.
//!
//! The lock is an exclusive advisory lock (`flock`) on `DIR/lock`, held for the life of the
//! process: the kernel drops it when the process ends, `kill -9` included, so a crash never
//! leaves a stale lock to clean up by hand. The file also records the holder's pid, only to name
//! it in the refusal.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name in DIR.
const LOCK_FILE: &str = "lock";

/// The SQLite file of the event log, the followers' state, identity, the bus and the counters.
const DATABASE_FILE: &str = "ledger.db";

/// The SQLite file of the read models: a file of its own, so that projection batches and
/// appends to the log do not wait for each other's write lock.
const READ_MODELS_FILE: &str = "read-models.db";

/// What holds DIR: `serve`, or a job that must not run beside it (`rebuild`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Serve,
    Rebuild,
    Migrate,
}

impl Holder {
    fn as_str(self) -> &'static str {
        match self {
            Holder::Serve => "ledger serve",
            Holder::Rebuild => "ledger rebuild",
            Holder::Migrate => "ledger migrate-log",
        }
    }
}

/// An open data directory, locked for this process.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held, not read: dropping it releases the lock.
    _lock: File,
}

impl DataDir {
    /// Creates DIR if it is missing (mode 0700: it holds secrets) and locks it, or explains who
    /// holds it.
    pub fn lock(path: &Path, holder: Holder) -> Result<DataDir> {
        create_private_dir(path)?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|error| io_error(&lock_path, "cannot open", &error))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder_text = String::new();
                // Best effort: the text only makes the message clearer.
                let _ = lock.read_to_string(&mut holder_text);
                let holder_text = holder_text.trim();
                let named = if holder_text.is_empty() {
                    "another process".to_owned()
                } else {
                    holder_text.to_owned()
                };
                return Err(Error::Busy(format!(
                    "{} is in use by {named}; one `ledger serve` (or `ledger rebuild`) per data \
                     directory. Stop it first, or choose another directory with --data.",
                    path.display()
                )));
            }
            Err(TryLockError::Error(error)) => {
                return Err(io_error(&lock_path, "cannot lock", &error));
            }
        }
        // Who holds it, for the refusal above; written only once the lock is ours.
        let text = format!("{} (pid {})\n", holder.as_str(), std::process::id());
        let written = lock
            .set_len(0)
            .and_then(|()| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| lock.write_all(text.as_bytes()));
        if let Err(error) = written {
            return Err(io_error(&lock_path, "cannot write", &error));
        }
        Ok(DataDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SQLite file of the event log, the read models, identity, the bus and the counters.
    pub fn database(&self) -> PathBuf {
        self.path.join(DATABASE_FILE)
    }

    /// The SQLite file of the read models.
    pub fn read_models(&self) -> PathBuf {
        self.path.join(READ_MODELS_FILE)
    }
}

/// The read models' file of DIR, for the commands that read it beside a live `serve`.
pub fn read_models_of(path: &Path) -> Result<PathBuf> {
    database_of(path)?;
    Ok(path.join(READ_MODELS_FILE))
}

/// The database file of DIR, for the commands that read beside a live `serve` without locking.
pub fn database_of(path: &Path) -> Result<PathBuf> {
    let database = path.join(DATABASE_FILE);
    if database.exists() {
        Ok(database)
    } else {
        Err(Error::Usage(format!(
            "{} holds no ledger ({} is missing); start one with `ledger serve --data {}`",
            path.display(),
            database.display(),
            path.display()
        )))
    }
}

fn create_private_dir(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .map_err(|error| io_error(path, "cannot create", &error))
}

pub(crate) fn io_error(path: &Path, what: &str, error: &std::io::Error) -> Error {
    Error::Usage(format!("{what} {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDir::lock(dir.path(), Holder::Serve).expect("first lock");
        let second = DataDir::lock(dir.path(), Holder::Rebuild).expect_err("second lock");
        let message = second.to_string();
        assert!(message.contains("ledger serve (pid"), "{message}");
        assert!(matches!(second, Error::Busy(_)));
        drop(first);
        // Released with its holder: the next one gets it.
        DataDir::lock(dir.path(), Holder::Rebuild).expect("lock after release");
    }

    #[test]
    fn a_missing_directory_is_created_private() {
        let parent = tempfile::tempdir().expect("tempdir");
        let path = parent.path().join("a").join("ledger-data");
        let dir = DataDir::lock(&path, Holder::Serve).expect("lock");
        assert!(dir.path().is_dir());
        assert!(!dir.database().exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn reading_a_directory_without_a_ledger_says_how_to_make_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let message = database_of(dir.path())
            .expect_err("no database")
            .to_string();
        assert!(message.contains("ledger serve --data"), "{message}");
    }
}
