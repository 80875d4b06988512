//! [`ChatService`]: the adapter between the event loop and the sans-IO chat [`Hub`].
//!
//! It owns what the hub must not touch: the store and its thread, the hashing threads, the
//! waker, the clock. Each loop callback becomes a `handle_*` call with the time passed in, and
//! the hub's effects are carried out right after: frames and closes go to the [`Outbox`],
//! hashing jobs to the workers, store requests to the store once per loop turn.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::auth::AuthPool;
use super::core::{AuthResult, Effect, Hub, Now, ID_RESERVE};
use super::protocol::ErrorCode;
use super::store::{self, Durability, Store};
use super::{ChatConfig, DurabilityArg, Wake};
use crate::service::{ConnId, Message, Outbox, Service};

/// The chat service. Construct with [`ChatService::open`]; register on `/ws`.
pub struct ChatService {
    hub: Hub,
    wake: Wake,
    store: Box<dyn Store>,
    auth: AuthPool,
    auth_rx: Receiver<AuthResult>,
    /// Frames the outbox accepted, and of those the chat-message deliveries.
    frames_out: u64,
    deliveries: u64,
    stopped: bool,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now(out: &dyn Outbox) -> Now {
    Now {
        mono: out.now(),
        wall_ms: wall_ms(),
    }
}

impl ChatService {
    /// Opens (creating if needed) the directory `data` and the SQLite database in it, loads
    /// accounts, sessions, rooms and memberships (not messages: those stay on disk and are
    /// loaded per room on first join), and starts the store and hashing threads.
    pub fn open(cfg: &ChatConfig, data: &Path) -> Result<ChatService, String> {
        let cfg = cfg.clone();
        if !(cfg.rate_limit.is_finite() && cfg.rate_limit >= 0.0) {
            return Err("--rate-limit must be >= 0".into());
        }
        if !(cfg.rate_burst.is_finite() && cfg.rate_burst >= 1.0) {
            return Err("--rate-burst must be >= 1".into());
        }
        let durability = match cfg.durability {
            DurabilityArg::Normal => Durability::Normal,
            DurabilityArg::Full => Durability::Full,
        };
        let start = Now {
            mono: std::time::Instant::now(),
            wall_ms: wall_ms(),
        };
        let wake = Wake::default();
        let dedup_since = start.wall_ms - cfg.dedup_window.as_millis() as i64;
        let (store, loaded, reserved) = match &cfg.database {
            Some(url) => {
                let opts = store::postgres::PgOptions {
                    node_ttl: cfg.node_ttl,
                    ..Default::default()
                };
                store::open_postgres(url, opts, dedup_since, wake.clone())
            }
            None => store::open_sqlite(data, durability, ID_RESERVE, dedup_since, wake.clone()),
        }
        .map_err(|e| e.to_string())?;
        if let Some(c) = &loaded.cluster {
            log::info!(
                "cluster: node {} on PostgreSQL, log at {}, {} connections on other nodes",
                c.node,
                c.log_pos,
                c.online.len()
            );
        }
        log::info!(
            "chat: {} users, {} rooms, {} sessions, next id {}",
            loaded.users.len(),
            loaded.rooms.len(),
            loaded.sessions.len(),
            loaded.next_id
        );

        let (auth_tx, auth_rx) = channel();
        let auth = AuthPool::start(
            cfg.hash_threads,
            cfg.argon2_memory,
            cfg.argon2_iterations,
            auth_tx,
            wake.clone(),
        )?;
        Ok(ChatService {
            hub: Hub::new(cfg, loaded, reserved, start),
            wake,
            store,
            auth,
            auth_rx,
            frames_out: 0,
            deliveries: 0,
            stopped: false,
        })
    }

    /// Carries out what the hub asked for: frames and closes through the outbox, hashing jobs
    /// to the workers. Store requests wait for the end of the loop turn.
    fn drain(&mut self, out: &mut dyn Outbox) {
        let fx = self.hub.effects();
        for effect in fx.list.drain(..) {
            match effect {
                Effect::Send { conn, json } => {
                    if out.send_text(conn, &json) {
                        self.frames_out += 1;
                    }
                }
                Effect::Broadcast {
                    frame,
                    from,
                    to,
                    message,
                } => {
                    let n = out.send_frame_to_all(&fx.recipients[from..to], &frame) as u64;
                    self.frames_out += n;
                    if message {
                        self.deliveries += n;
                    }
                }
                Effect::Close { conn, code, reason } => out.close(conn, code, reason),
                Effect::Auth(job) => self.auth.submit(job),
            }
        }
        fx.recipients.clear();
    }

    /// Hands the turn's store requests to the store in one go.
    fn hand_to_store(&mut self) {
        let fx = self.hub.effects();
        if !fx.store.is_empty() {
            self.store.submit(std::mem::take(&mut fx.store));
        }
    }

    /// The hub, for tests that look at its state.
    #[cfg(test)]
    pub(crate) fn hub(&self) -> &Hub {
        &self.hub
    }
}

impl Service for ChatService {
    fn init(&mut self, waker: Arc<mio::Waker>) {
        self.wake.set(waker);
        // Results that arrived before the waker existed are still queued: make sure the loop
        // looks at them.
        self.wake.wake();
    }

    fn on_open(&mut self, out: &mut dyn Outbox, conn: ConnId, peer: SocketAddr) {
        self.hub.handle_open(conn, Some(peer.ip()), now(out));
        self.drain(out);
    }

    fn on_message(&mut self, out: &mut dyn Outbox, conn: ConnId, msg: Message<'_>) {
        match msg {
            Message::Text(t) => self.hub.handle_text(conn, t, now(out)),
            Message::Binary(_) => self.hub.handle_binary(conn, now(out)),
        }
        self.drain(out);
    }

    fn on_close(&mut self, out: &mut dyn Outbox, conn: ConnId) {
        self.hub.handle_close(conn, now(out));
        self.drain(out);
    }

    fn on_wake(&mut self, out: &mut dyn Outbox) {
        while let Ok(res) = self.auth_rx.try_recv() {
            self.hub.handle_auth_result(res, now(out));
            self.drain(out);
        }
        while let Some(ev) = self.store.try_event() {
            self.hub.handle_store_event(ev, now(out));
            self.drain(out);
        }
    }

    fn on_tick(&mut self, out: &mut dyn Outbox) {
        self.hub.handle_tick(now(out));
        self.drain(out);
    }

    fn health(&self, now: std::time::Instant) -> Result<(), String> {
        self.hub.store_health(now)
    }

    fn metrics(&self, out: &mut String) {
        let hub = &self.hub;
        let m = hub.counters();
        let mut w = crate::prom::Writer::new(out);
        w.gauge(
            "parlor_chat_connections",
            "Authenticated chat connections.",
            hub.authenticated(),
        );
        w.gauge(
            "parlor_chat_users_online",
            "Users with at least one authenticated connection.",
            hub.users_online(),
        );
        w.gauge(
            "parlor_chat_rooms_warm",
            "Rooms whose recent messages are held in memory (rooms with a member online).",
            hub.rooms_warm(),
        );
        w.counter(
            "parlor_chat_messages_in_total",
            "Chat messages (say/dm) accepted.",
            m.messages_in,
        );
        w.counter(
            "parlor_chat_messages_out_total",
            "Chat message deliveries queued to connections.",
            self.deliveries,
        );
        w.counter(
            "parlor_chat_frames_out_total",
            "All chat frames queued to connections.",
            self.frames_out,
        );
        w.counter(
            "parlor_chat_logins_total",
            "Successful password logins.",
            m.logins_ok,
        );
        w.counter(
            "parlor_chat_login_failures_total",
            "Failed logins and resumes.",
            m.logins_failed,
        );
        w.counter(
            "parlor_chat_store_failures_total",
            "Store batches that failed to commit.",
            m.store_failures,
        );
        w.gauge(
            "parlor_chat_hash_jobs_waiting",
            "Sign-ins (register/login) waiting for a hashing thread.",
            hub.hash_jobs_waiting(),
        );
        w.gauge(
            "parlor_chat_sessions",
            "Session tokens held (expire after --session-ttl without use).",
            hub.session_count(),
        );
        w.gauge(
            "parlor_chat_store_pending_writes",
            "Replies (acks, welcomes, logout closes, id reservations) waiting for the store to commit their writes.",
            hub.replies_waiting_for_commit(),
        );
        w.summary(
            "parlor_chat_store_batch_seconds",
            "Time to apply and commit one store batch.",
            &m.store_batch_seconds,
        );
        w.summary(
            "parlor_chat_store_batch_writes",
            "Writes per store batch (group commit).",
            &m.store_batch_writes,
        );
        w.summary(
            "parlor_chat_ack_seconds",
            "From accepting a message to sending its ack (durable commit).",
            &m.ack_seconds,
        );
        w.labelled(
            "parlor_chat_errors_total",
            crate::prom::Kind::Counter,
            "Error frames sent, by code.",
            "code",
            ErrorCode::ALL.map(|c| (c.as_str(), m.errors[c.index()])),
        );
        if let Some(pos) = hub.log_position() {
            w.gauge(
                "parlor_cluster_log_position",
                "Cluster mode: the last replication-log position this node applied.",
                pos,
            );
        }
        // Backend figures (cluster mode: peers, bus lag, store round trips, reconnects).
        for (name, help, value) in self.store.metrics() {
            if name.ends_with("_total") {
                w.counter(name, help, value);
            } else {
                w.gauge(name, help, value);
            }
        }
    }

    fn on_turn_end(&mut self) {
        self.hand_to_store();
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Everything handed over before is committed before the store stops.
        self.hand_to_store();
        self.store.shutdown();
        self.auth.stop();
    }
}

impl Drop for ChatService {
    fn drop(&mut self) {
        self.shutdown();
    }
}
