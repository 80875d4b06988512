//! Read state, notification levels and search: `read`, `notify`, `search`, and the unread
//! counts `welcome` carries (see `docs/PROTOCOL.md`, "Read state, notification levels and
//! search").
//!
//! Read markers and levels live in each user's `convs` (loaded at startup, written through to
//! the store), so `read` and `notify` are decided from memory. Unread counts need the messages
//! after each marker, which only the store has: signing in asks for them
//! ([`Query::Unread`]) and sends `welcome` when they come.

use crate::chat::core::state::ConvPrefs;
use crate::chat::core::{Hub, Pending, QueryWaiter};
use crate::chat::protocol::{ConvInfo, ErrorCode, ServerFrame};
use crate::chat::search;
use crate::chat::store::{self, Query, SearchQuery, Unread, UnreadQuery, Write};
use crate::chat::validate;
use crate::service::ConnId;

const LEVELS: [&str; 3] = ["all", "mentions", "none"];

/// A search's default and largest `limit`.
const DEFAULT_SEARCH_LIMIT: u32 = 20;
const MAX_SEARCH_LIMIT: u32 = 50;

/// A conversation named by a client frame, resolved.
struct Named {
    /// Room name or DM pair key.
    conv: String,
    room: Option<String>,
    /// The other person's account name, for a DM.
    with: Option<String>,
}

impl Hub {
    /// Resolves exactly one of `room` (a member's) or `with` (an existing user) into a
    /// conversation; answers the error and returns `None` otherwise.
    fn conversation(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        with: Option<String>,
        r: Option<&str>,
    ) -> Option<Named> {
        match (room, with) {
            (Some(room), None) => {
                if let Err((c, m)) = validate::room_name(&room) {
                    self.error(conn, c, &m, r);
                    return None;
                }
                if !self
                    .rooms
                    .get(&room)
                    .is_some_and(|rm| rm.members.contains(key))
                {
                    self.error(conn, ErrorCode::NotMember, "not a member", r);
                    return None;
                }
                Some(Named {
                    conv: room.clone(),
                    room: Some(room),
                    with: None,
                })
            }
            (None, Some(with)) => {
                if let Err((c, m)) = validate::user_name(&with) {
                    self.error(conn, c, &m, r);
                    return None;
                }
                let wk = validate::user_key(&with);
                let Some(w) = self.users.get(&wk) else {
                    self.error(conn, ErrorCode::NoSuchUser, "no such user", r);
                    return None;
                };
                Some(Named {
                    conv: store::dm_key(key, &wk),
                    room: None,
                    with: Some(w.name.clone()),
                })
            }
            _ => {
                self.error(
                    conn,
                    ErrorCode::BadRequest,
                    "exactly one of room and with is required",
                    r,
                );
                None
            }
        }
    }

    /// Moves `key`'s read marker of `conv` forward to `id` (memory and store); false if it
    /// already was there or beyond.
    pub(in crate::chat::core) fn advance_read(&mut self, key: &str, conv: &str, id: i64) -> bool {
        let Some(u) = self.users.get_mut(key) else {
            return false;
        };
        let prefs = u.convs.entry(conv.to_string()).or_default();
        if id <= prefs.read {
            return false;
        }
        prefs.read = id;
        self.write(Write::SetRead {
            user_key: key.to_string(),
            conv: conv.to_string(),
            id,
        });
        true
    }

    /// A user who joins a room has "read" it up to now: its history is not unread.
    pub(in crate::chat::core) fn read_on_join(&mut self, key: &str, room: &str) {
        let head = self.head_seq();
        self.advance_read(key, room, head);
    }

    pub(in crate::chat::core) fn read(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        with: Option<String>,
        id: i64,
        r: Option<&str>,
    ) {
        let Some(named) = self.conversation(conn, key, room, with, r) else {
            return;
        };
        if id < 0 || id > self.head_seq() {
            return self.error(conn, ErrorCode::BadRequest, "no such message id", r);
        }
        if self.advance_read(key, &named.conv, id) {
            let json = ServerFrame::Read {
                room: named.room.as_deref(),
                with: named.with.as_deref(),
                id,
            }
            .to_json();
            // The user's other devices clear their badges; this one knows.
            self.send_to_own_others(key, conn, &json);
        }
        if let Some(reference) = r {
            let ack = Pending::ChangeAck {
                conn,
                reference: Some(reference.to_string()),
                id,
                seq: None,
                ts: self.now.wall_ms,
                assigned: false,
            };
            self.after_commit_or_now(ack);
        }
    }

    pub(in crate::chat::core) fn notify(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        with: Option<String>,
        level: String,
        r: Option<&str>,
    ) {
        if !LEVELS.contains(&level.as_str()) {
            return self.error(
                conn,
                ErrorCode::BadRequest,
                "level must be all, mentions or none",
                r,
            );
        }
        let Some(named) = self.conversation(conn, key, room, with, r) else {
            return;
        };
        if let Some(u) = self.users.get_mut(key) {
            u.convs.entry(named.conv.clone()).or_default().notify = Some(level.clone());
        }
        self.write(Write::SetNotify {
            user_key: key.to_string(),
            conv: named.conv,
            level: level.clone(),
        });
        let frame = |reference| ServerFrame::Notify {
            room: named.room.as_deref(),
            with: named.with.as_deref(),
            level: &level,
            reference,
        };
        self.send(conn, &frame(r));
        let json = frame(None).to_json();
        self.send_to_own_others(key, conn, &json);
    }

    #[allow(clippy::too_many_arguments)]
    pub(in crate::chat::core) fn search(
        &mut self,
        conn: ConnId,
        key: &str,
        q: String,
        (room, with, from): (Option<String>, Option<String>, Option<String>),
        before: Option<i64>,
        limit: Option<u32>,
        r: Option<&str>,
    ) {
        let Ok(fts) = search::fts_query(&q) else {
            return self.error(conn, ErrorCode::BadRequest, "nothing to search for", r);
        };
        let limit = limit.unwrap_or(DEFAULT_SEARCH_LIMIT);
        if limit == 0 || limit > MAX_SEARCH_LIMIT {
            return self.error(conn, ErrorCode::BadRequest, "limit must be 1-50", r);
        }
        if let Some(f) = &from {
            if let Err((c, m)) = validate::user_name(f) {
                return self.error(conn, c, &m, r);
            }
        }
        let convs = if room.is_some() || with.is_some() {
            match self.conversation(conn, key, room, with, r) {
                Some(named) => vec![named.conv],
                None => return,
            }
        } else {
            self.conversations_of(key)
        };
        if !self.admit_query(conn, key, r) {
            return;
        }
        let Some(cancelled) = self.query_started(conn) else {
            return;
        };
        self.query(
            Query::Search {
                search: SearchQuery {
                    fts,
                    convs,
                    from,
                    before,
                    limit: limit as usize,
                },
                cancelled: Some(cancelled),
            },
            QueryWaiter::Search {
                conn,
                reference: r.map(str::to_string),
            },
        );
    }

    pub(in crate::chat::core) fn on_search(
        &mut self,
        conn: ConnId,
        reference: Option<String>,
        results: Vec<crate::chat::protocol::ChatMessage>,
        more: bool,
    ) {
        if !self.query_answered(conn) {
            return;
        }
        let json = ServerFrame::Search {
            results: results.iter().collect(),
            more,
            reference: reference.as_deref(),
        }
        .to_json();
        self.send_json(conn, json);
    }

    /// Frames `json` once for `key`'s connections other than `conn`.
    fn send_to_own_others(&mut self, key: &str, conn: ConnId, json: &str) {
        self.collect_conns(std::iter::once(&key.to_string()), conn);
        self.broadcast(json, false);
    }

    /// Every conversation key of `key`: rooms, then DM pair keys.
    pub(in crate::chat::core) fn conversations_of(&self, key: &str) -> Vec<String> {
        let Some(u) = self.users.get(key) else {
            return Vec::new();
        };
        let mut convs: Vec<String> = u.rooms.iter().cloned().collect();
        convs.extend(u.dm_partners.iter().map(|p| store::dm_key(key, p)));
        convs
    }

    /// Signing in: asks the store for the unread counts `welcome` carries; the connection
    /// stays blocked (its frames wait) until [`Hub::finish_welcome`].
    pub(in crate::chat::core) fn count_unread_then_welcome(
        &mut self,
        conn: ConnId,
        key: &str,
        token: &str,
        reference: Option<&str>,
    ) {
        let Some(u) = self.users.get(key) else {
            return;
        };
        let mut convs: Vec<UnreadQuery> = u
            .rooms
            .iter()
            .map(|room| UnreadQuery {
                conv: room.clone(),
                dm: false,
                read: u.convs.get(room).map_or(0, |p| p.read),
            })
            .collect();
        for p in &u.dm_partners {
            let conv = store::dm_key(key, p);
            let read = u.convs.get(&conv).map_or(0, |p| p.read);
            convs.push(UnreadQuery {
                conv,
                dm: true,
                read,
            });
        }
        let (user, names) = (u.name.clone(), vec![u.name.clone(), u.nick.clone()]);
        let keys = convs.iter().map(|c| c.conv.clone()).collect();
        self.block(conn);
        self.query(
            Query::Unread { user, names, convs },
            QueryWaiter::Welcome {
                conn,
                key: key.to_string(),
                token: token.to_string(),
                reference: reference.map(str::to_string),
                convs: keys,
            },
        );
    }

    /// The `conversations` of `welcome`: `convs` (room names and DM pair keys, as asked) with
    /// the counts the store found for each.
    pub(in crate::chat::core) fn conversations_info<'a>(
        &'a self,
        key: &str,
        convs: &'a [String],
        counts: &[Unread],
    ) -> Vec<ConvInfo<'a>> {
        let Some(u) = self.users.get(key) else {
            return Vec::new();
        };
        let default = ConvPrefs::default();
        convs
            .iter()
            .zip(
                counts
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(Unread::default())),
            )
            .filter_map(|(conv, c)| {
                // A DM pair key is both user keys around a newline; a room name has none.
                let (room, with) = match conv.split_once('\n') {
                    None => (Some(conv.as_str()), None),
                    Some((a, b)) => {
                        let other = if a == key { b } else { a };
                        (None, Some(self.users.get(other)?.name.as_str()))
                    }
                };
                let prefs = u.convs.get(conv).unwrap_or(&default);
                let fallback = if room.is_some() { "mentions" } else { "all" };
                let notify = match prefs.notify.as_deref() {
                    Some(l) => LEVELS
                        .iter()
                        .find(|x| **x == l)
                        .copied()
                        .unwrap_or(fallback),
                    None => fallback,
                };
                Some(ConvInfo {
                    room,
                    with,
                    read: prefs.read,
                    unread: c.unread,
                    mentions: c.mentions,
                    notify,
                })
            })
            .collect()
    }
}
