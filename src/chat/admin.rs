//! `parlor user …`: the operator's account commands, on the same `--data` as the server,
//! whether it runs or not.
//!
//! The rules are `register`'s: [`validate`] for names and passwords, [`confusable`] for
//! look-alike names, argon2id made by [`auth::hash_password`] as the hashing workers make it.
//! Reading and writing is [`crate::chat::store::accounts`]; a running server notices each
//! change within [`crate::chat::store::sqlite::CHANGE_POLL`] (see the store's change log), so
//! a disabled user's connections close and a new password's old tokens stop working at once.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::confusable::skeleton_keys;
use super::store::accounts::{Account, Accounts, Added, Changed};
use super::store::StoreError;
use super::{auth, validate};

/// Why an account command failed; the text is what the operator reads.
#[derive(Debug)]
pub enum AdminError {
    /// A name or password that `register` would refuse too.
    Invalid(String),
    /// The name, or one that looks like it, belongs to `holder`.
    Taken {
        name: String,
        holder: String,
    },
    NoSuchUser(String),
    Hash(String),
    Store(StoreError),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Invalid(why) => f.write_str(why),
            AdminError::Taken { name, holder } if name.eq_ignore_ascii_case(holder) => {
                write!(f, "user {holder} already exists")
            }
            AdminError::Taken { name, holder } => {
                write!(f, "user name {name} looks like the existing user {holder}")
            }
            AdminError::NoSuchUser(name) => write!(f, "no user {name}"),
            AdminError::Hash(e) => write!(f, "hashing the password: {e}"),
            AdminError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AdminError {}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> AdminError {
        AdminError::Store(e)
    }
}

/// argon2id cost of new hashes: the server's `--argon2-memory` / `--argon2-iterations`.
#[derive(Debug, Clone, Copy)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check(c: validate::Check) -> Result<(), AdminError> {
    c.map_err(|(_, why)| AdminError::Invalid(why))
}

fn hash(password: &str, cost: HashCost) -> Result<String, AdminError> {
    check(validate::password(password))?;
    auth::hash_password(password, cost.memory_kib, cost.iterations).map_err(AdminError::Hash)
}

/// `parlor user add NAME`: a new account, member of `general`, refused when the name (any
/// case) exists or looks like another account's name or nick, as `register` refuses it.
pub fn add_user(
    dir: &Path,
    name: &str,
    password: &str,
    cost: HashCost,
) -> Result<String, AdminError> {
    check(validate::user_name(name))?;
    let phc = hash(password, cost)?;
    let key = validate::user_key(name);
    let keys = skeleton_keys(name);
    let looks_alike = |a: &Account| {
        [&a.name, &a.nick]
            .iter()
            .any(|n| skeleton_keys(n).iter().any(|k| keys.contains(k)))
    };
    match Accounts::open(dir, true)?.add(&key, name, &phc, now_ms(), looks_alike)? {
        Added::Added => Ok(format!("added user {name}")),
        Added::Taken { holder } => Err(AdminError::Taken {
            name: name.to_string(),
            holder,
        }),
    }
}

/// The account's key, or `NoSuchUser` for a name no account could have.
fn key_of(name: &str) -> Result<String, AdminError> {
    validate::user_name(name).map_err(|_| AdminError::NoSuchUser(name.to_string()))?;
    Ok(validate::user_key(name))
}

fn sessions(n: usize) -> String {
    match n {
        1 => "1 session revoked".to_string(),
        n => format!("{n} sessions revoked"),
    }
}

/// `parlor user passwd NAME`: a new password; every session of the account ends.
pub fn set_password(
    dir: &Path,
    name: &str,
    password: &str,
    cost: HashCost,
) -> Result<String, AdminError> {
    let key = key_of(name)?;
    let phc = hash(password, cost)?;
    match Accounts::open(dir, false)?.set_password(&key, &phc, now_ms())? {
        Changed::Done { sessions_revoked } => Ok(format!(
            "changed the password of {name}; {}",
            sessions(sessions_revoked)
        )),
        Changed::NoSuchUser | Changed::Unchanged => Err(AdminError::NoSuchUser(name.to_string())),
    }
}

/// `parlor user disable NAME` / `enable NAME`. Disabling ends every session of the account.
pub fn set_disabled(dir: &Path, name: &str, disabled: bool) -> Result<String, AdminError> {
    let key = key_of(name)?;
    let what = if disabled { "disabled" } else { "enabled" };
    match Accounts::open(dir, false)?.set_disabled(&key, disabled, now_ms())? {
        Changed::NoSuchUser => Err(AdminError::NoSuchUser(name.to_string())),
        Changed::Unchanged => Ok(format!("{name} was already {what}")),
        Changed::Done {
            sessions_revoked: n,
        } if disabled => Ok(format!("disabled {name}; {}", sessions(n))),
        Changed::Done { .. } => Ok(format!("enabled {name}")),
    }
}

/// `parlor user list`: every account, ordered by name.
pub fn list_users(dir: &Path) -> Result<Vec<Account>, AdminError> {
    Ok(Accounts::open(dir, false)?.list()?)
}

/// `parlor user list` as text: one line per account, tab-separated columns `name`, `nick`,
/// `created` and `last_seen` (RFC 3339 UTC; `-` for never), `enabled` or `disabled`. A nick
/// cannot hold a tab (control characters are refused), so the columns always split cleanly.
pub fn list_text(accounts: &[Account]) -> String {
    let time = |ms: i64| crate::logfmt::rfc3339_ms(ms.max(0) as u128);
    accounts
        .iter()
        .map(|a| {
            format!(
                "{}\t{}\t{}\t{}\t{}\n",
                a.name,
                a.nick,
                time(a.created),
                a.last_seen.map(time).unwrap_or_else(|| "-".into()),
                if a.disabled { "disabled" } else { "enabled" }
            )
        })
        .collect()
}

/// `parlor user list --json`: one JSON array of `{name, nick, created, last_seen, disabled}`,
/// times in milliseconds since the Unix epoch (`last_seen` null for never), like the
/// protocol's `ts`.
pub fn list_json(accounts: &[Account]) -> String {
    let list: Vec<serde_json::Value> = accounts
        .iter()
        .map(|a| {
            serde_json::json!({
                "name": a.name,
                "nick": a.nick,
                "created": a.created,
                "last_seen": a.last_seen,
                "disabled": a.disabled,
            })
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::store::{open_sqlite, Durability, StoreEvent};
    use crate::chat::testutil::TempDir;
    use crate::chat::Wake;

    const CHEAP: HashCost = HashCost {
        memory_kib: 64,
        iterations: 1,
    };

    #[test]
    fn add_refuses_taken_look_alike_and_invalid_names() {
        let dir = TempDir::new("admin-add");
        assert_eq!(
            add_user(dir.path(), "Alice", "password123", CHEAP).unwrap(),
            "added user Alice"
        );
        let e = add_user(dir.path(), "alice", "password123", CHEAP).unwrap_err();
        assert_eq!(e.to_string(), "user Alice already exists");
        let e = add_user(dir.path(), "aIice", "password123", CHEAP).unwrap_err();
        assert_eq!(
            e.to_string(),
            "user name aIice looks like the existing user Alice"
        );
        let e = add_user(dir.path(), "bob", "short", CHEAP).unwrap_err();
        assert!(matches!(e, AdminError::Invalid(_)), "{e}");
        let e = add_user(dir.path(), "b b", "password123", CHEAP).unwrap_err();
        assert!(matches!(e, AdminError::Invalid(_)), "{e}");
        let list = list_users(dir.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].name.as_str(), list[0].nick.as_str()),
            ("Alice", "Alice")
        );
        assert!(!list[0].disabled && list[0].last_seen.is_none());
    }

    #[test]
    fn commands_on_a_missing_user_or_database_fail() {
        let dir = TempDir::new("admin-missing");
        let e = set_disabled(dir.path(), "bob", true).unwrap_err();
        assert!(e.to_string().contains("no chat database"), "{e}");
        assert!(
            !dir.path().join("chat.db").exists(),
            "only add creates a database"
        );
        add_user(dir.path(), "alice", "password123", CHEAP).unwrap();
        for e in [
            set_disabled(dir.path(), "bob", true).unwrap_err(),
            set_password(dir.path(), "bob", "password123", CHEAP).unwrap_err(),
            set_password(dir.path(), "no way", "password123", CHEAP).unwrap_err(),
        ] {
            assert!(matches!(e, AdminError::NoSuchUser(_)), "{e}");
        }
    }

    /// What the commands write is what a server loads: the new account in `general`, a
    /// disabled flag, a new password hash, sessions gone; and a running store reports each
    /// change with the row as it then is.
    #[test]
    fn changes_reach_a_running_store_and_the_next_start() {
        let dir = TempDir::new("admin-store");
        add_user(dir.path(), "alice", "password123", CHEAP).unwrap();
        let (mut st, loaded, _) =
            open_sqlite(dir.path(), Durability::Normal, 10, 0, Wake::default()).unwrap();
        assert_eq!(loaded.users.len(), 1);
        assert!(loaded
            .members
            .contains(&("general".to_string(), "alice".to_string())));
        assert!(loaded.rooms.contains(&"general".to_string()));
        // Changes made before the store opened are loaded, not reported again.
        add_user(dir.path(), "bob", "password123", CHEAP).unwrap();
        assert_eq!(
            set_disabled(dir.path(), "Bob", true).unwrap(),
            "disabled Bob; 0 sessions revoked"
        );
        assert_eq!(
            set_disabled(dir.path(), "bob", true).unwrap(),
            "bob was already disabled"
        );
        set_password(dir.path(), "alice", "new password", CHEAP).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < 3 {
            match st.try_event() {
                Some(StoreEvent::UserChanged { change, key, user }) => {
                    got.push((change, key, user.unwrap().unwrap()))
                }
                Some(_) => {}
                None => {
                    assert!(std::time::Instant::now() < deadline, "got {got:?}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        use crate::chat::store::UserChange::*;
        let kinds: Vec<_> = got.iter().map(|(c, k, _)| (*c, k.as_str())).collect();
        assert_eq!(
            kinds,
            [(Added, "bob"), (Disabled, "bob"), (Password, "alice")]
        );
        assert!(got[1].2.disabled);
        assert_ne!(
            got[2].2.phc, loaded.users[0].phc,
            "the event carries the new hash"
        );
        st.shutdown();
        drop(st);
        let (_, loaded, _) =
            open_sqlite(dir.path(), Durability::Normal, 10, 0, Wake::default()).unwrap();
        let bob = loaded.users.iter().find(|u| u.key == "bob").unwrap();
        assert!(bob.disabled);
        assert_eq!(
            set_disabled(dir.path(), "bob", false).unwrap(),
            "enabled bob"
        );
        assert!(!list_users(dir.path()).unwrap()[1].disabled);
    }

    /// A command waits for the server's write lock instead of failing with "database is
    /// locked".
    #[test]
    fn a_command_waits_for_another_writer() {
        let dir = TempDir::new("admin-busy");
        add_user(dir.path(), "alice", "password123", CHEAP).unwrap();
        let server = rusqlite::Connection::open(dir.path().join("chat.db")).unwrap();
        server.execute_batch("BEGIN IMMEDIATE").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(400));
            server.execute_batch("COMMIT").unwrap();
        });
        let t = std::time::Instant::now();
        set_disabled(dir.path(), "alice", true).unwrap();
        assert!(t.elapsed() >= std::time::Duration::from_millis(300));
        holder.join().unwrap();
        assert!(list_users(dir.path()).unwrap()[0].disabled);
    }

    #[test]
    fn list_formats() {
        let accounts = [
            Account {
                key: "alice".into(),
                name: "alice".into(),
                nick: "Ally ✨".into(),
                created: 1_764_557_761_113,
                last_seen: None,
                disabled: false,
            },
            Account {
                key: "bob".into(),
                name: "Bob".into(),
                nick: "Bob".into(),
                created: 0,
                last_seen: Some(86_400_000),
                disabled: true,
            },
        ];
        assert_eq!(
            list_text(&accounts),
            "alice\tAlly ✨\t2025-12-01T02:56:01.113Z\t-\tenabled\n\
             Bob\tBob\t1970-01-01T00:00:00.000Z\t1970-01-02T00:00:00.000Z\tdisabled\n"
        );
        let v: serde_json::Value = serde_json::from_str(&list_json(&accounts)).unwrap();
        assert_eq!(v[0]["last_seen"], serde_json::Value::Null);
        assert_eq!(v[1]["disabled"], true);
        assert_eq!(v[1]["created"], 0);
        assert_eq!(v[0]["nick"], "Ally ✨");
    }
}
