//! Accounts changed outside the protocol: by an operator command in another process
//! (`parlor user add`, `passwd`, `disable`, `enable`), which the store reports with the
//! account's row as it now is, or reloaded after the hub's own write of an account failed.
//! The stored row is the truth and the hub adopts it:
//!
//! - a new account is added (a member of `general`, whose members see `presence` `join`);
//! - a new password or a disable ends every session: tokens are forgotten, sign-ins in flight
//!   are refused (`cred_epoch`), and the account's connections are closed at once — after a
//!   disable with an `account_disabled` error and close 1008, after a new password with close
//!   1000 ("password changed"), as after a `logout`;
//! - a registration whose account row did not store (the name was taken by `parlor user add`
//!   after the hub checked it) gets no welcome: its session is revoked, the row is reloaded,
//!   and the client is told `user_taken` (or `internal` if there is no row at all).

use crate::chat::confusable::{skeleton_keys, SkeletonIndex};
use crate::chat::core::cmd::auth::{token_hash, ACCOUNT_DISABLED};
use crate::chat::core::state::{Ring, Room, User};
use crate::chat::core::{Hub, Pending, GENERAL, NOBODY};
use crate::chat::protocol::ErrorCode;
use crate::chat::store::{LoadedUser, StoreReq, UserChange, Write};
use crate::service::{CloseCode, ConnId};

/// Moves `user`'s entry in a look-alike index from `old` to `new`.
fn rekey(index: &mut SkeletonIndex, user: &str, old: &str, new: &str) {
    if old != new {
        index.remove(&skeleton_keys(old), user);
        index.insert(&skeleton_keys(new), user);
    }
}

impl Hub {
    pub(in crate::chat::core) fn on_user_changed(
        &mut self,
        change: UserChange,
        key: String,
        user: Result<Option<LoadedUser>, String>,
    ) {
        let taken = matches!(user, Ok(Some(_)));
        match user {
            Ok(Some(row)) => self.adopt(change, row),
            Ok(None) => self.forget_user(&key),
            // Unreadable: what is in memory stays as it is.
            Err(e) => log::error!("chat: reloading account {key}: {e}"),
        }
        if change != UserChange::Reloaded {
            return;
        }
        for (conn, reference) in self.reloads.remove(&key).unwrap_or_default() {
            if !self.conns.contains_key(&conn) {
                continue;
            }
            let (code, message) = if taken {
                (ErrorCode::UserTaken, "user name is taken")
            } else {
                (ErrorCode::Internal, "could not store the account")
            };
            self.auth_failed(conn, code, message, reference.as_deref());
        }
    }

    /// Makes the in-memory account `row.key` what the store says it is.
    fn adopt(&mut self, change: UserChange, row: LoadedUser) {
        let key = row.key.clone();
        let Some(u) = self.users.get_mut(&key) else {
            return self.add_account(change, row);
        };
        if matches!(change, UserChange::Added | UserChange::Reloaded) {
            // A registration that lost the race held the name with its own spelling.
            rekey(&mut self.name_skeletons, &key, &u.name, &row.name);
            rekey(&mut self.nick_skeletons, &key, &u.nick, &row.nick);
            u.name = row.name;
            u.nick = row.nick;
        }
        let new_password = u.phc != row.phc || change == UserChange::Password;
        u.phc = row.phc;
        u.disabled = row.disabled;
        if row.disabled || new_password {
            self.end_sessions(&key);
        }
    }

    /// An account the hub has not seen: `parlor user add` made it a member of `general`.
    fn add_account(&mut self, change: UserChange, row: LoadedUser) {
        let key = row.key.clone();
        self.name_skeletons.insert(&skeleton_keys(&row.name), &key);
        self.nick_skeletons.insert(&skeleton_keys(&row.nick), &key);
        let mut user = User::new(key.clone(), row.name, row.nick, row.phc);
        user.last_seen = row.last_seen;
        user.disabled = row.disabled;
        self.users.insert(key.clone(), user);
        if change == UserChange::Added {
            if !self.rooms.contains_key(GENERAL) {
                // Created by the command; it has no messages yet, but the store is the judge.
                self.rooms
                    .insert(GENERAL.to_string(), Room::new(Ring::Cold));
            }
            self.enter_room(NOBODY, &key, GENERAL);
        }
    }

    /// Forgets every session of `key` (memory and store) and closes its connections; sign-ins
    /// verified against the old credentials are refused.
    fn end_sessions(&mut self, key: &str) {
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        u.cred_epoch += 1;
        let disabled = u.disabled;
        let revoked: Vec<[u8; 32]> = u.sessions.drain(..).collect();
        let conns = u.conns.clone();
        for h in &revoked {
            self.sessions.remove(h);
        }
        if !revoked.is_empty() {
            // The command deleted the rows it saw; this one catches a session the hub issued
            // after that.
            self.write(Write::DeleteUserSessions {
                user_key: key.to_string(),
            });
        }
        for c in conns {
            match self.conns.get_mut(&c) {
                Some(x) if !x.closing => x.closing = true,
                _ => continue, // already on its way out
            }
            if disabled {
                self.error(c, ErrorCode::AccountDisabled, ACCOUNT_DISABLED, None);
                self.close(c, CloseCode::PolicyViolation, "account disabled");
            } else {
                self.close(c, CloseCode::Normal, "password changed");
            }
        }
    }

    /// A registration's account row failed to store: most likely `parlor user add` created
    /// the same name after the hub checked it. Its welcome is cancelled (no token for an
    /// account that is not the client's), its session revoked, and the row reloaded; the
    /// client hears the verdict when the row comes back (`on_user_changed`).
    pub(in crate::chat::core) fn account_not_stored(
        &mut self,
        conn: ConnId,
        key: String,
        phc: &str,
        reference: Option<String>,
    ) {
        let mut token = None;
        self.pending.retain(|(_, p)| match p {
            Pending::Welcome {
                conn: c, token: t, ..
            } if *c == conn => {
                token = Some(t.clone());
                false
            }
            _ => true,
        });
        if let Some(t) = token {
            self.revoke_session(&key, token_hash(&t));
        }
        if let Some(u) = self.users.get_mut(&key) {
            u.cred_epoch += 1;
            if u.phc == phc {
                // Still the registration's (the operator's row was not adopted yet): until
                // the reload, no password opens this account (an empty hash verifies nothing).
                u.phc.clear();
            }
        }
        let waiting = self.reloads.entry(key.clone()).or_default();
        waiting.push((conn, reference));
        if waiting.len() == 1 {
            self.fx.store.push(StoreReq::LoadUser { key });
        }
    }

    /// The store has no account `key`: drop what memory holds of it (a registration whose row
    /// never stored).
    fn forget_user(&mut self, key: &str) {
        let Some(u) = self.users.remove(key) else {
            return;
        };
        self.name_skeletons.remove(&skeleton_keys(&u.name), key);
        self.nick_skeletons.remove(&skeleton_keys(&u.nick), key);
        self.online.remove(key);
        self.dedup_users.remove(key);
        self.membership_epoch += 1;
        for h in &u.sessions {
            self.sessions.remove(h);
        }
        if !u.sessions.is_empty() {
            self.write(Write::DeleteUserSessions {
                user_key: key.to_string(),
            });
        }
        for p in &u.dm_partners {
            if let Some(other) = self.users.get_mut(p) {
                other.dm_partners.remove(key);
            }
        }
        for room in &u.rooms {
            if let Some(r) = self.rooms.get_mut(room) {
                r.members.remove(key);
            }
            self.maybe_unwatched.insert(room.clone());
            self.write(Write::RemoveMember {
                room: room.clone(),
                user_key: key.to_string(),
            });
        }
        for c in u.conns {
            if let Some(x) = self.conns.get_mut(&c) {
                x.closing = true;
            }
            self.close(c, CloseCode::PolicyViolation, "account removed");
        }
    }
}
