//! Sessions after sign-in: `logout` (one token or all of a user's), token use and
//! revocation, expiry after `--session-ttl`, and the `--auth-timeout` deadline for
//! connections that never sign in.

use std::collections::HashSet;
use std::time::Instant;

use crate::chat::core::{Hub, Pending, SWEEP_INTERVAL};
use crate::chat::store::Write;
use crate::service::{CloseCode, ConnId};

impl Hub {
    /// Revokes the connection's token (or, with `all`, every token of the user) and closes
    /// every connection that used a revoked token. They stop being served at once; the close
    /// (1000) goes out once the revocation is durable, so a client may forget the token knowing
    /// it is dead even if we crash right after.
    pub(in crate::chat::core) fn logout(&mut self, conn: ConnId, key: &str, all: bool) {
        let hash = self.conns.get(&conn).and_then(|c| c.token_hash);
        let revoked: Vec<[u8; 32]> = if all {
            self.users
                .get(key)
                .map(|u| u.sessions.iter().copied().collect())
                .unwrap_or_default()
        } else {
            hash.into_iter().collect()
        };
        for h in &revoked {
            self.sessions.remove(h);
        }
        if let Some(u) = self.users.get_mut(key) {
            u.sessions.retain(|h| !revoked.contains(h));
        }
        if all {
            self.write(Write::DeleteUserSessions {
                user_key: key.to_string(),
            });
        } else if let Some(h) = hash {
            self.write(Write::DeleteSession { hash: h });
        }
        let user_conns = self
            .users
            .get(key)
            .map(|u| u.conns.clone())
            .unwrap_or_default();
        let mut closing = vec![conn];
        for c in user_conns {
            if c == conn {
                continue;
            }
            let uses_revoked = self
                .conns
                .get(&c)
                .and_then(|x| x.token_hash)
                .is_some_and(|h| revoked.contains(&h));
            if all || uses_revoked {
                closing.push(c);
            }
        }
        for c in &closing {
            if let Some(x) = self.conns.get_mut(c) {
                x.closing = true;
            }
        }
        self.after_commit(Pending::Close { conns: closing });
    }

    /// Marks a session used now (resume, or a connection using it closing).
    pub(in crate::chat::core) fn touch_session(&mut self, hash: [u8; 32], ts: i64) {
        if let Some(s) = self.sessions.get_mut(&hash) {
            s.last_used = ts;
            self.write(Write::TouchSession { hash, ts });
        }
    }

    /// Forgets a session token (memory and store).
    pub(in crate::chat::core) fn revoke_session(&mut self, key: &str, hash: [u8; 32]) {
        self.forget_session(key, hash);
        self.write(Write::DeleteSession { hash });
    }

    /// Forgets a session token in memory only (its row is deleted separately, or was never
    /// committed).
    pub(in crate::chat::core) fn forget_session(&mut self, key: &str, hash: [u8; 32]) {
        self.sessions.remove(&hash);
        if let Some(u) = self.users.get_mut(key) {
            u.sessions.retain(|h| *h != hash);
        }
    }

    /// Closes connections that did not authenticate within `--auth-timeout`. Deadlines are
    /// queued in connection order, so only due ones are looked at.
    pub(in crate::chat::core) fn expire_unauthenticated(&mut self, now: Instant) {
        while let Some(&(at, conn)) = self.auth_deadlines.front() {
            if at > now {
                break;
            }
            self.auth_deadlines.pop_front();
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            // A sign-in waiting for its hash is the server's delay, not the client's.
            if c.user.is_some() || c.auth_pending || c.closing {
                continue;
            }
            c.closing = true;
            self.close(conn, CloseCode::PolicyViolation, "authentication timeout");
        }
    }

    /// Once a minute: forget sessions unused for `--session-ttl` (except those in use by an
    /// open connection, which count as used) and dedup refs older than `--dedup-window`.
    pub(in crate::chat::core) fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_INTERVAL)
        {
            return;
        }
        self.last_sweep = Some(now);
        let now_ms = self.now.wall_ms;
        let ttl = self.cfg.session_ttl.as_millis() as i64;
        let in_use: HashSet<[u8; 32]> = self.conns.values().filter_map(|c| c.token_hash).collect();
        let expired: Vec<([u8; 32], String)> = self
            .sessions
            .iter()
            .filter(|(h, s)| now_ms - s.last_used > ttl && !in_use.contains(*h))
            .map(|(h, s)| (*h, s.user.clone()))
            .collect();
        for (hash, key) in expired {
            self.revoke_session(&key, hash);
        }
        let before_ts = now_ms - self.cfg.dedup_window.as_millis() as i64;
        self.write(Write::PruneDedup { before_ts });
        let before_ts = now_ms - self.cfg.event_retention.as_millis() as i64;
        let keep = self.cfg.event_retention_count;
        self.write(Write::PruneEvents { before_ts, keep });
    }
}
