//! Sign-in: `register`, `login`, `resume`, the hashing queue in front of the workers, login
//! throttles, and issuing sessions. What happens to a session afterwards is in `sessions.rs`.

use core::net::IpAddr;
use std::collections::VecDeque;

use crate::chat::confusable::skeleton_keys;
use crate::chat::core::effects::{AuthJob, AuthResult, Effect};
use crate::chat::core::state::{Ring, Room, Session, User};
use crate::chat::core::{AuthWaiter, Hub, Pending, QueuedHash, GENERAL, MAX_SESSIONS};
use crate::chat::hashq::Refused;
use crate::chat::protocol::{Command, ErrorCode, PresenceEvent, ServerFrame};
use crate::chat::store::Write;
use crate::chat::validate;
use crate::chat::Registration;
use crate::service::ConnId;
use sha2::{Digest, Sha256};

/// The message of `account_disabled`.
pub(in crate::chat::core) const ACCOUNT_DISABLED: &str =
    "this account is disabled; ask the server's administrator";

/// What the store keeps instead of a session token. A fast hash is right here: the token
/// already has 128 bits of entropy, so there is nothing to brute-force that slowing down would
/// protect.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Hub {
    pub(in crate::chat::core) fn handle_auth(
        &mut self,
        conn: ConnId,
        cmd: Command,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        let (authed, pending, ip) = match self.conns.get(&conn) {
            Some(c) => (c.user.is_some(), c.auth_pending, c.addr),
            None => return,
        };
        if authed {
            return self.error(conn, ErrorCode::BadRequest, "already authenticated", r);
        }
        if pending {
            return self.error(
                conn,
                ErrorCode::BadRequest,
                "authentication already in progress",
                r,
            );
        }
        match cmd {
            Command::Register { user, password } => {
                self.register(conn, ip, user, password, reference)
            }
            Command::Login { user, password } => self.login(conn, ip, user, password, reference),
            Command::Resume { token } => self.resume(conn, &token, reference),
            _ => {}
        }
    }

    fn register(
        &mut self,
        conn: ConnId,
        ip: Option<IpAddr>,
        user: String,
        password: String,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        let now = self.now.mono;
        if self.cfg.registration == Registration::Closed {
            return self.error(
                conn,
                ErrorCode::RegistrationClosed,
                "registration is closed on this server; ask its administrator for an account",
                r,
            );
        }
        if let Err((code, msg)) =
            validate::user_name(&user).and_then(|_| validate::password(&password))
        {
            return self.error(conn, code, &msg, r);
        }
        let key = validate::user_key(&user);
        let skeleton = skeleton_keys(&user);
        // Nobody may register a name that looks like another account's name or
        // another user's nick (`aIice` beside `alice`).
        if self.users.contains_key(&key)
            || self.registering.held_by_other(&skeleton, "")
            || self.name_skeletons.held_by_other(&skeleton, &key)
            || self.nick_skeletons.held_by_other(&skeleton, &key)
        {
            return self.error(conn, ErrorCode::UserTaken, "user name is taken", r);
        }
        if ip.is_some_and(|ip| self.register_throttle.is_blocked(&ip, now)) {
            return self.error(
                conn,
                ErrorCode::RateLimited,
                "too many registrations from this address; try again later",
                r,
            );
        }
        let Some(job) = self.queue_hash(conn, ip, r, |job| AuthJob::Hash { job, password }) else {
            return;
        };
        if let Some(ip) = ip {
            self.register_throttle.record_failure(ip, now);
        }
        self.registering.insert(&skeleton, &key);
        let waiter = AuthWaiter::Register {
            conn,
            key,
            skeleton,
            name: user,
            reference,
        };
        self.wait_for_hash(conn, job, waiter);
    }

    /// Queues a hashing job for `conn` (numbered here), or answers `rate_limited` when the
    /// queue refuses it. Returns the job's number.
    fn queue_hash(
        &mut self,
        conn: ConnId,
        ip: Option<IpAddr>,
        r: Option<&str>,
        make: impl FnOnce(u64) -> AuthJob,
    ) -> Option<u64> {
        self.next_job += 1;
        let job = make(self.next_job);
        match self.hash_queue.push(ip, QueuedHash { conn, job }) {
            Ok(()) => Some(self.next_job),
            Err(why) => {
                self.hash_queue_full(conn, why, r);
                None
            }
        }
    }

    /// The connection waits for hashing job `job`: its later messages queue behind it.
    fn wait_for_hash(&mut self, conn: ConnId, job: u64, waiter: AuthWaiter) {
        self.jobs.insert(job, waiter);
        self.set_auth_pending(conn, true);
        self.pump_hashes();
    }

    fn login(
        &mut self,
        conn: ConnId,
        ip: Option<IpAddr>,
        user: String,
        password: String,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        let now = self.now.mono;
        if let Err((code, msg)) = validate::user_name(&user) {
            return self.error(conn, code, &msg, r);
        }
        if password.len() > 1024 {
            return self.error(conn, ErrorCode::BadRequest, "password too long", r);
        }
        let key = validate::user_key(&user);
        // Said before any hashing: that the account exists is no secret (`register` says
        // `user_taken`), and a password check would tell a guesser when it was right.
        if self.users.get(&key).is_some_and(|u| u.disabled) {
            return self.error(conn, ErrorCode::AccountDisabled, ACCOUNT_DISABLED, r);
        }
        // Attempts still being hashed count as failures until they are known not to
        // be, so parallel guesses cannot all slip past the limit.
        let pair = (key.clone(), ip);
        if self.pair_throttle.is_blocked(&pair, now)
            || ip.is_some_and(|ip| self.ip_throttle.is_blocked(&ip, now))
            || self.account_throttle.is_blocked(&key, now)
        {
            return self.error(
                conn,
                ErrorCode::RateLimited,
                "too many failed logins; try again later",
                r,
            );
        }
        // Unknown users are verified against a dummy hash (phc None) so that the
        // answer takes as long as for a wrong password.
        let (phc, epoch) = match self.users.get(&key) {
            Some(u) => (Some(u.phc.clone()), u.cred_epoch),
            None => (None, 0),
        };
        let make = |job| AuthJob::Verify { job, phc, password };
        let Some(job) = self.queue_hash(conn, ip, r, make) else {
            return;
        };
        self.pair_throttle.begin(pair);
        if let Some(ip) = ip {
            self.ip_throttle.begin(ip);
        }
        self.account_throttle.begin(key.clone());
        let waiter = AuthWaiter::Login {
            conn,
            key,
            ip,
            reference,
            epoch,
        };
        self.wait_for_hash(conn, job, waiter);
    }

    fn resume(&mut self, conn: ConnId, token: &str, reference: Option<String>) {
        self.resume_with(conn, token, reference, true);
    }

    /// `resume`; with `may_park` (cluster mode) an unknown token waits a moment for the log
    /// instead of failing at once (see `park_resume`). Returns whether the connection signs in
    /// (or waits to): false when it was refused.
    pub(in crate::chat::core) fn resume_with(
        &mut self,
        conn: ConnId,
        token: &str,
        reference: Option<String>,
        may_park: bool,
    ) -> bool {
        let r = reference.as_deref();
        // A valid token is never refused because of anyone's failed logins: it is
        // 128 random bits, so there is nothing to guess, and refusing it would let a
        // stranger's typos log people out. Hence no throttle on this path at all.
        let hash = token_hash(token);
        let ttl = self.cfg.session_ttl.as_millis() as i64;
        let now_ms = self.now.wall_ms;
        let (key, expired) = match self.sessions.get(&hash) {
            Some(s) if self.users.contains_key(&s.user) => {
                (Some(s.user.clone()), now_ms - s.last_used > ttl)
            }
            _ => (None, false),
        };
        let disabled = key
            .as_ref()
            .is_some_and(|k| self.users.get(k).is_some_and(|u| u.disabled));
        match key {
            // Disabling revokes every token, so this is only a safety net.
            Some(_) if disabled => {
                self.m.logins_failed += 1;
                self.error(conn, ErrorCode::AccountDisabled, ACCOUNT_DISABLED, r);
                false
            }
            Some(key) if !expired => {
                self.touch_session(hash, now_ms);
                self.authenticate(conn, &key, token, reference.as_deref());
                true
            }
            Some(key) => {
                self.revoke_session(&key, hash);
                self.m.logins_failed += 1;
                self.error(conn, ErrorCode::AuthFailed, "session expired", r);
                false
            }
            None if may_park && self.park_resume(conn, token, &reference) => true,
            None => {
                self.m.logins_failed += 1;
                self.error(conn, ErrorCode::AuthFailed, "invalid token", r);
                false
            }
        }
    }

    pub(in crate::chat::core) fn hash_queue_full(
        &mut self,
        conn: ConnId,
        why: Refused,
        r: Option<&str>,
    ) {
        let msg = match why {
            Refused::AddressFull => "too many sign-ins waiting from this address; try again later",
            Refused::QueueFull => "server busy with sign-ins; try again later",
        };
        self.error(conn, ErrorCode::RateLimited, msg, r);
    }

    /// Hands queued hashing jobs to free workers, fairly across addresses.
    pub(in crate::chat::core) fn pump_hashes(&mut self) {
        while let Some(q) = self.hash_queue.next_job() {
            self.fx.list.push(Effect::Auth(q.job));
        }
    }

    /// Undoes the bookkeeping of a hashing job whose result will never be used.
    pub(in crate::chat::core) fn abandon_job(&mut self, job: u64) {
        match self.jobs.remove(&job) {
            Some(AuthWaiter::Register { skeleton, key, .. }) => {
                self.registering.remove(&skeleton, &key);
            }
            Some(AuthWaiter::Login { key, ip, .. }) => self.finish_login_attempt(key, ip),
            None => {}
        }
    }

    pub(in crate::chat::core) fn finish_login_attempt(&mut self, key: String, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            self.ip_throttle.finish(&ip);
        }
        self.account_throttle.finish(&key);
        self.pair_throttle.finish(&(key, ip));
    }

    /// Marks an authentication in progress; the connection's later messages wait for it
    /// (a client may pipeline `login` and `join` without waiting for `welcome`).
    pub(in crate::chat::core) fn set_auth_pending(&mut self, conn: ConnId, v: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.auth_pending = v;
        }
        if v {
            self.block(conn);
        }
    }

    /// Ends a failed authentication: the error, then whatever the client sent meanwhile.
    pub(in crate::chat::core) fn auth_failed(
        &mut self,
        conn: ConnId,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
    ) {
        self.set_auth_pending(conn, false);
        self.error(conn, code, message, reference);
        self.unblock(conn);
    }

    pub(in crate::chat::core) fn on_auth_result(&mut self, res: AuthResult) {
        let now = self.now.mono;
        // A worker is free: the next address in turn gets it.
        self.hash_queue.done();
        self.pump_hashes();
        match res {
            AuthResult::Hashed { job, phc, token } => {
                let Some(AuthWaiter::Register {
                    conn,
                    key,
                    skeleton,
                    name,
                    reference,
                }) = self.jobs.remove(&job)
                else {
                    return;
                };
                self.registering.remove(&skeleton, &key);
                if !self.conns.contains_key(&conn) {
                    // The client is gone before getting a token: creating the account anyway
                    // would leave a name it cannot use until it remembers the password.
                    return;
                }
                let phc = match phc {
                    Ok(p) => p,
                    Err(e) => {
                        log::error!("chat: hashing failed: {e}");
                        return self.auth_failed(
                            conn,
                            ErrorCode::Internal,
                            "could not hash password",
                            reference.as_deref(),
                        );
                    }
                };
                let created = self.now.wall_ms;
                self.write(Write::InsertUser {
                    key: key.clone(),
                    name: name.clone(),
                    nick: name.clone(),
                    phc: phc.clone(),
                    created,
                });
                self.after_commit(Pending::Account {
                    conn,
                    key: key.clone(),
                    phc: phc.clone(),
                    reference: reference.clone(),
                });
                self.name_skeletons.insert(&skeleton, &key);
                self.nick_skeletons.insert(&skeleton, &key);
                self.users
                    .insert(key.clone(), User::new(key.clone(), name.clone(), name, phc));
                if !self.rooms.contains_key(GENERAL) {
                    self.rooms
                        .insert(GENERAL.to_string(), Room::new(Ring::Warm(VecDeque::new())));
                    self.write(Write::InsertRoom {
                        name: GENERAL.into(),
                        created,
                    });
                }
                // Members of general see the newcomer arrive like any other join.
                self.add_member(conn, &key, GENERAL);
                self.issue_token(conn, key, token, reference);
            }
            AuthResult::Verified { job, ok, token } => {
                let Some(AuthWaiter::Login {
                    conn,
                    key,
                    ip,
                    reference,
                    epoch,
                }) = self.jobs.remove(&job)
                else {
                    return;
                };
                self.finish_login_attempt(key.clone(), ip);
                let account = self.users.get(&key).map(|u| (u.disabled, u.cred_epoch));
                if account.is_some_and(|(disabled, _)| disabled) {
                    // Disabled while its hash was checked.
                    if self.conns.contains_key(&conn) {
                        let r = reference.as_deref();
                        self.auth_failed(conn, ErrorCode::AccountDisabled, ACCOUNT_DISABLED, r);
                    }
                } else if ok && account.is_some_and(|(_, now)| now == epoch) {
                    if self.conns.contains_key(&conn) {
                        self.m.logins_ok += 1;
                        self.issue_token(conn, key, token, reference);
                    }
                } else {
                    self.m.logins_failed += 1;
                    self.account_throttle.record_failure(key.clone(), now);
                    self.pair_throttle.record_failure((key, ip), now);
                    if let Some(ip) = ip {
                        self.ip_throttle.record_failure(ip, now);
                    }
                    if self.conns.contains_key(&conn) {
                        self.auth_failed(
                            conn,
                            ErrorCode::AuthFailed,
                            "wrong user or password",
                            reference.as_deref(),
                        );
                    }
                }
            }
        }
    }

    /// Creates a session and sends `welcome` once it (and the account, for register) commits:
    /// a token the client holds must survive a crash.
    pub(in crate::chat::core) fn issue_token(
        &mut self,
        conn: ConnId,
        key: String,
        token: Option<String>,
        reference: Option<String>,
    ) {
        let Some(token) = token else {
            log::error!("chat: the hashing worker had no randomness for a token");
            return self.auth_failed(
                conn,
                ErrorCode::Internal,
                "could not create a session",
                reference.as_deref(),
            );
        };
        let hash = token_hash(&token);
        let created = self.now.wall_ms;
        self.sessions.insert(
            hash,
            Session {
                user: key.clone(),
                last_used: created,
            },
        );
        let mut evicted = Vec::new();
        if let Some(u) = self.users.get_mut(&key) {
            u.sessions.push_back(hash);
            while u.sessions.len() > MAX_SESSIONS {
                evicted.extend(u.sessions.pop_front());
            }
        }
        for old in evicted {
            self.sessions.remove(&old);
            self.write(Write::DeleteSession { hash: old });
        }
        self.write(Write::InsertSession {
            hash,
            user_key: key.clone(),
            created,
        });
        self.after_commit(Pending::Welcome {
            conn,
            user: key,
            token,
            reference,
        });
    }

    /// Marks `conn` as `key`'s, announces the user online if this is its first connection,
    /// and sends `welcome`.
    /// A sign-in succeeded: `welcome` follows once its unread counts are in (the connection
    /// waits, blocked, and is not yet a recipient of anything).
    pub(in crate::chat::core) fn authenticate(
        &mut self,
        conn: ConnId,
        key: &str,
        token: &str,
        reference: Option<&str>,
    ) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.count_unread_then_welcome(conn, key, token, reference);
    }

    /// The connection becomes the user's (presence, fan-out lists) and gets `welcome`.
    pub(in crate::chat::core) fn finish_welcome(
        &mut self,
        conn: ConnId,
        key: &str,
        token: &str,
        reference: Option<&str>,
        convs: &[String],
        counts: &[crate::chat::store::Unread],
    ) {
        let session_alive = self.sessions.contains_key(&token_hash(token));
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !session_alive {
            // Revoked (logout everywhere, a new password) while the counts were read.
            c.backlog = None;
            return self.auth_failed(conn, ErrorCode::AuthFailed, "session revoked", reference);
        }
        c.user = Some(key.to_string());
        c.auth_pending = false;
        c.token_hash = Some(token_hash(token));
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        let first = u.conns.is_empty();
        u.conns.push(conn);
        self.membership_epoch += 1;
        if first && self.local_presence(key, true) {
            self.online.insert(key.to_string());
            self.collect_sharer_conns(key, conn);
            let u = &self.users[key];
            let json = ServerFrame::Presence {
                room: None,
                user: &u.name,
                nick: &u.nick,
                event: PresenceEvent::Online,
                last_seen: None,
            }
            .to_json();
            self.broadcast(&json, false);
        }
        let u = &self.users[key];
        let json = ServerFrame::Welcome {
            user: &u.name,
            nick: &u.nick,
            token,
            rooms: u.rooms.iter().map(|s| s.as_str()).collect(),
            seq: self.head_seq(),
            conversations: self.conversations_info(key, convs, counts),
            reference,
        }
        .to_json();
        self.send_json(conn, json);
        self.unblock(conn);
    }
}
