//! `typing`: best-effort indicators, throttled per user and target.

use crate::chat::core::{conns_of, Hub};
use crate::chat::protocol::{ErrorCode, ServerFrame};
use crate::chat::validate;
use crate::service::ConnId;

impl Hub {
    pub(in crate::chat::core) fn typing(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        to: Option<String>,
        r: Option<&str>,
    ) {
        let now = self.now.mono;
        // The throttle key; recipients are only gathered for events that pass the throttle.
        let target = match (&room, &to) {
            (Some(room), None) => {
                if let Err((c, m)) = validate::room_name(room) {
                    return self.error(conn, c, &m, r);
                }
                match self.rooms.get(room) {
                    Some(rm) if rm.members.contains(key) => format!("#{room}"),
                    _ => return self.error(conn, ErrorCode::NotMember, "not a member", r),
                }
            }
            (None, Some(to)) => {
                if let Err((c, m)) = validate::user_name(to) {
                    return self.error(conn, c, &m, r);
                }
                let tk = validate::user_key(to);
                if !self.users.contains_key(&tk) {
                    return self.error(conn, ErrorCode::NoSuchUser, "no such user", r);
                }
                format!("@{tk}")
            }
            _ => {
                return self.error(
                    conn,
                    ErrorCode::BadRequest,
                    "exactly one of room and to is required",
                    r,
                )
            }
        };
        let tkey = (key.to_string(), target);
        if let Some(last) = self.typing.get(&tkey) {
            if now.saturating_duration_since(*last) < self.cfg.typing_interval {
                return; // throttled silently: typing is best effort
            }
        }
        self.typing.insert(tkey, now);
        // Everyone else in the room, or the other side of the DM; never the typist's own
        // connections. Gathered only now, for an event that passed the throttle.
        let to_key = to.as_deref().map(validate::user_key);
        match (&room, &to_key) {
            (Some(room), _) => {
                let others = self.rooms[room].members.iter().filter(|m| *m != key);
                conns_of(&mut self.scratch, &self.users, others, conn);
            }
            (_, to_key) => {
                let other = to_key.iter().filter(|tk| *tk != key);
                conns_of(&mut self.scratch, &self.users, other, conn);
            }
        }
        self.send_typing(key, room.as_deref(), to_key.as_deref());
        self.relay_typing(key, room.as_deref(), to_key);
    }

    /// `key`'s `typing` frame (in `room`, or to `to_key` in a DM) to the connections gathered
    /// in `scratch`: from a `typing` here or one another node logged.
    pub(in crate::chat::core) fn send_typing(
        &mut self,
        key: &str,
        room: Option<&str>,
        to_key: Option<&str>,
    ) {
        let Some(u) = self.users.get(key) else {
            return;
        };
        let to_name = to_key
            .and_then(|t| self.users.get(t))
            .map(|u| u.name.as_str());
        let json = ServerFrame::Typing {
            room,
            to: to_name,
            user: &u.name,
            nick: &u.nick,
        }
        .to_json();
        self.broadcast(&json, false);
    }
}
