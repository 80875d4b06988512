//! What the hub asks of the world. The hub never performs I/O: every decision that needs a
//! socket, a worker thread or the store becomes an [`Effect`] (or a [`StoreReq`]) queued here,
//! in order, for the caller to carry out after each `handle_*` call.

use std::time::Instant;

use crate::chat::store::StoreReq;
use crate::service::{CloseCode, ConnId, SharedFrame};

/// The time a `handle_*` call happens at, given by the caller: the hub never reads a clock.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time, for windows, deadlines and rate limits.
    pub mono: Instant,
    /// Wall-clock milliseconds since the Unix epoch, for timestamps that clients see or that
    /// must survive a restart (message `ts`, `last_seen`, session use).
    pub wall_ms: i64,
}

/// A password-hashing job for a worker (argon2id is far too slow for the loop).
#[derive(Debug)]
pub enum AuthJob {
    /// Hash a new password (register).
    Hash { job: u64, password: String },
    /// Verify a password against a stored PHC string; `None` = unknown user, verified against
    /// a dummy hash so that unknown users take as long as wrong passwords.
    Verify {
        job: u64,
        phc: Option<String>,
        password: String,
    },
}

impl AuthJob {
    pub fn id(&self) -> u64 {
        match self {
            AuthJob::Hash { job, .. } | AuthJob::Verify { job, .. } => *job,
        }
    }
}

/// A worker's answer. The worker also draws the session token a successful sign-in will get
/// (randomness is I/O too), so the hub stays deterministic.
#[derive(Debug)]
pub enum AuthResult {
    Hashed {
        job: u64,
        phc: Result<String, String>,
        token: Option<String>,
    },
    Verified {
        job: u64,
        ok: bool,
        token: Option<String>,
    },
}

#[derive(Debug)]
pub enum Effect {
    /// One text frame (JSON) to one connection.
    Send { conn: ConnId, json: String },
    /// One frame, encoded once, to the connections `recipients[from..to]`. `message` marks a
    /// chat message (for the delivery counter).
    Broadcast {
        frame: SharedFrame,
        from: usize,
        to: usize,
        message: bool,
    },
    /// Close handshake with a code and reason.
    Close {
        conn: ConnId,
        code: CloseCode,
        reason: &'static str,
    },
    /// Hash or verify a password on a worker; the result comes back to `handle_auth_result`.
    Auth(AuthJob),
}

/// Effects of the calls so far, drained by the caller. The vectors keep their capacity, so a
/// broadcast costs one `Effect` and one `ConnId` per recipient in a reused buffer: nothing is
/// allocated per recipient.
#[derive(Debug, Default)]
pub struct Effects {
    pub list: Vec<Effect>,
    /// Recipient lists of the `Broadcast`s in `list`.
    pub recipients: Vec<ConnId>,
    /// Store requests, in order; handed to the store once per loop turn.
    pub store: Vec<StoreReq>,
}

impl Effects {
    /// Clears `list` and `recipients` after the caller has carried them out.
    pub fn clear_sent(&mut self) {
        self.list.clear();
        self.recipients.clear();
    }
}
