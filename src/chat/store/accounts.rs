//! Account changes made by an operator command (`parlor user …`) on `dir/chat.db`, from
//! another process than the server: offline, or beside a running server.
//!
//! Each change is one `BEGIN IMMEDIATE` transaction (waiting up to
//! [`super::sqlite::BUSY_WAIT`] for the
//! server's write lock) that also appends a row to `admin_changes`. A running server's store
//! thread polls that log (every [`super::sqlite::CHANGE_POLL`]) and reports each change with
//! the account's row as it now is ([`super::StoreEvent::UserChanged`]); a server that starts
//! later loads the rows themselves. The rules (which names are allowed, how passwords are
//! hashed) are the caller's, `chat::admin`; this module only reads and writes.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::sqlite::{open_db, sql};
use super::{Durability, StoreError, UserChange};

/// The room every new account is a member of (as `register` does).
const GENERAL: &str = "general";

/// One account as `parlor user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub key: String,
    pub name: String,
    pub nick: String,
    /// Milliseconds since the Unix epoch.
    pub created: i64,
    /// When its last connection closed (ms), if ever.
    pub last_seen: Option<i64>,
    pub disabled: bool,
}

/// What [`Accounts::add`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    Added,
    /// The name is the account `holder`'s (same name in any case, or one that looks alike).
    Taken {
        holder: String,
    },
}

/// What [`Accounts::set_password`] and [`Accounts::set_disabled`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    NoSuchUser,
    /// The account was already in that state; nothing was written.
    Unchanged,
    /// Done; this many sessions (tokens) were revoked.
    Done {
        sessions_revoked: usize,
    },
}

/// `dir/chat.db` opened for account changes.
pub struct Accounts {
    conn: Connection,
}

impl Accounts {
    /// Opens `dir/chat.db` (migrating it to this build's schema, as the server would). A
    /// missing database is created when `create` (an operator may make the first account
    /// before the first start) and an error otherwise.
    pub fn open(dir: &Path, create: bool) -> Result<Accounts, StoreError> {
        let path = dir.join("chat.db");
        if !create && !path.is_file() {
            return Err(StoreError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no chat database here (check --data)",
                ),
            });
        }
        // Rare and small: every change is fsynced. `open_db` sets the busy timeout.
        let conn = open_db(dir, Durability::Full)?;
        Ok(Accounts { conn })
    }

    /// Every account, by name (case-insensitively).
    pub fn list(&self) -> Result<Vec<Account>, StoreError> {
        read_accounts(&self.conn).map_err(sql("list users"))
    }

    /// Creates the account `name` (key `key`, password hash `phc`, created `now`) as a member
    /// of `general`, unless an account has the same key or `looks_alike` says an existing one
    /// is too close to it. The check and the insert are one transaction, so two operators
    /// cannot both pass it.
    pub fn add(
        &mut self,
        key: &str,
        name: &str,
        phc: &str,
        now: i64,
        looks_alike: impl Fn(&Account) -> bool,
    ) -> Result<Added, StoreError> {
        let tx = self.begin()?;
        let existing = read_accounts(&tx).map_err(sql("read users"))?;
        if let Some(a) = existing.iter().find(|a| a.key == key || looks_alike(a)) {
            return Ok(Added::Taken {
                holder: a.name.clone(),
            });
        }
        let insert = || -> rusqlite::Result<()> {
            tx.execute(
                "INSERT INTO users (key, name, nick, phc, created) VALUES (?1, ?2, ?2, ?3, ?4)",
                params![key, name, phc, now],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO rooms (name, created) VALUES (?1, ?2)",
                params![GENERAL, now],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO members (room, user_key) VALUES (?1, ?2)",
                params![GENERAL, key],
            )?;
            log_change(&tx, key, UserChange::Added, now)
        };
        insert().map_err(sql("add user"))?;
        tx.commit().map_err(sql("commit"))?;
        Ok(Added::Added)
    }

    /// Sets a new password hash and revokes every session of the account.
    pub fn set_password(&mut self, key: &str, phc: &str, now: i64) -> Result<Changed, StoreError> {
        let tx = self.begin()?;
        let n = tx
            .execute(
                "UPDATE users SET phc = ?2 WHERE key = ?1",
                params![key, phc],
            )
            .map_err(sql("set password"))?;
        if n == 0 {
            return Ok(Changed::NoSuchUser);
        }
        let revoked = revoke_sessions(&tx, key)?;
        log_change(&tx, key, UserChange::Password, now).map_err(sql("log change"))?;
        tx.commit().map_err(sql("commit"))?;
        Ok(Changed::Done {
            sessions_revoked: revoked,
        })
    }

    /// Disables (revoking every session) or enables the account.
    pub fn set_disabled(
        &mut self,
        key: &str,
        disabled: bool,
        now: i64,
    ) -> Result<Changed, StoreError> {
        let tx = self.begin()?;
        let was: Option<bool> = tx
            .query_row(
                "SELECT disabled FROM users WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read user"))?;
        match was {
            None => return Ok(Changed::NoSuchUser),
            Some(was) if was == disabled => return Ok(Changed::Unchanged),
            Some(_) => {}
        }
        tx.execute(
            "UPDATE users SET disabled = ?2 WHERE key = ?1",
            params![key, disabled],
        )
        .map_err(sql("set disabled"))?;
        let (revoked, change) = if disabled {
            (revoke_sessions(&tx, key)?, UserChange::Disabled)
        } else {
            (0, UserChange::Enabled)
        };
        log_change(&tx, key, change, now).map_err(sql("log change"))?;
        tx.commit().map_err(sql("commit"))?;
        Ok(Changed::Done {
            sessions_revoked: revoked,
        })
    }

    /// A write transaction: waits for the server's write lock rather than failing.
    fn begin(&mut self) -> Result<Transaction<'_>, StoreError> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))
    }
}

fn read_accounts(conn: &Connection) -> rusqlite::Result<Vec<Account>> {
    let mut st = conn.prepare(
        "SELECT key, name, nick, created, last_seen, disabled FROM users ORDER BY key, name",
    )?;
    let rows = st.query_map([], |r| {
        Ok(Account {
            key: r.get(0)?,
            name: r.get(1)?,
            nick: r.get(2)?,
            created: r.get(3)?,
            last_seen: r.get(4)?,
            disabled: r.get(5)?,
        })
    })?;
    rows.collect()
}

fn revoke_sessions(tx: &Transaction<'_>, key: &str) -> Result<usize, StoreError> {
    tx.execute("DELETE FROM sessions WHERE user_key = ?1", params![key])
        .map_err(sql("revoke sessions"))
}

/// Appends to the log a running server polls.
fn log_change(
    tx: &Transaction<'_>,
    key: &str,
    change: UserChange,
    now: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO admin_changes (user_key, kind, ts) VALUES (?1, ?2, ?3)",
        params![key, change.as_str(), now],
    )
    .map(|_| ())
}
