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
        match (&room, &to) {
            (Some(room), _) => {
                let others = self.rooms[room].members.iter().filter(|m| *m != key);
                conns_of(&mut self.scratch, &self.users, others, conn);
            }
            (_, to) => {
                let other = to.as_ref().map(|t| validate::user_key(t));
                let other = other.iter().filter(|tk| *tk != key);
                conns_of(&mut self.scratch, &self.users, other, conn);
            }
        }
        let u = &self.users[key];
        let to_name = to
            .as_ref()
            .and_then(|t| self.users.get(&validate::user_key(t)))
            .map(|u| u.name.as_str());
        let json = ServerFrame::Typing {
            room: room.as_deref(),
            to: to_name,
            user: &u.name,
            nick: &u.nick,
        }
        .to_json();
        self.broadcast(&json, false);
        let to_key = to.as_deref().map(validate::user_key);
        self.relay_typing(key, room.as_deref(), to_key);
    }
}
