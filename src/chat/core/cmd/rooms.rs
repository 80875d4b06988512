//! Rooms and presence: `join` (with the join-snapshot ring), `leave`, `rooms`, `who`, and the
//! rings' life cycle.

use std::collections::VecDeque;

use crate::chat::core::state::{Ring, Room};
use crate::chat::core::{Hub, QueryWaiter};
use crate::chat::protocol::{
    ChatMessage, ErrorCode, MemberInfo, PresenceEvent, RoomInfo, ServerFrame, WhoMember,
};
use crate::chat::store::{Query, Write};
use crate::chat::validate;
use crate::service::ConnId;

impl Hub {
    pub(in crate::chat::core) fn join(
        &mut self,
        conn: ConnId,
        key: &str,
        room: String,
        reference: Option<String>,
    ) {
        let r = reference.as_deref();
        if let Err((c, m)) = validate::room_name(&room) {
            return self.error(conn, c, &m, r);
        }
        let is_member = self.users.get(key).is_some_and(|u| u.rooms.contains(&room));
        if !is_member
            && self
                .users
                .get(key)
                .is_some_and(|u| u.rooms.len() >= self.cfg.max_rooms_per_user)
        {
            let msg = format!("at most {} rooms per user", self.cfg.max_rooms_per_user);
            return self.error(conn, ErrorCode::BadRequest, &msg, r);
        }
        if !self.rooms.contains_key(&room) {
            // Rooms are never deleted, so creating one costs a token like a message does.
            if !self.take_token(key, self.now.mono) {
                return self.error(conn, ErrorCode::RateLimited, "creating rooms too fast", r);
            }
            // A new room has no history: its ring is warm (and empty) from the start.
            self.rooms
                .insert(room.clone(), Room::new(Ring::Warm(VecDeque::new())));
            self.write(Write::InsertRoom {
                name: room.clone(),
                created: self.now.wall_ms,
            });
        }
        // Membership changes now, in request order with everything else; only the `joined`
        // reply may have to wait for the ring.
        self.add_member(conn, key, &room);
        let cap = self.cfg.history_on_join;
        let Some(rm) = self.rooms.get_mut(&room) else {
            return;
        };
        match rm.ring {
            Ring::Warm(_) => self.send_joined(conn, &room, r),
            Ring::Cold if cap == 0 => {
                rm.ring = Ring::Warm(VecDeque::new());
                self.send_joined(conn, &room, r)
            }
            Ring::Loading(_) => {
                rm.pending_joins.push((conn, reference));
                self.membership_epoch += 1;
                self.block(conn);
            }
            Ring::Cold => {
                rm.ring = Ring::Loading(Vec::new());
                rm.pending_joins.push((conn, reference));
                self.membership_epoch += 1;
                self.block(conn);
                self.query(
                    Query::LoadRing {
                        room: room.clone(),
                        limit: cap,
                        upto: self.cluster.as_ref().map(|c| c.log_pos),
                    },
                    QueryWaiter::Ring { room },
                );
            }
        }
    }

    /// Makes `key` a member of `room` (if it is not already) and tells the room.
    pub(in crate::chat::core) fn add_member(&mut self, conn: ConnId, key: &str, room: &str) {
        if self.enter_room(conn, key, room) {
            self.write(Write::AddMember {
                room: room.to_string(),
                user_key: key.to_string(),
            });
            self.read_on_join(key, room);
        }
    }

    /// Makes `key` a member of `room` in memory (the store is the caller's business) and tells
    /// the members' connections, except `conn`, with `presence` `join`. False if `key` already
    /// was a member (or the room does not exist).
    pub(in crate::chat::core) fn enter_room(
        &mut self,
        conn: ConnId,
        key: &str,
        room: &str,
    ) -> bool {
        let Some(rm) = self.rooms.get_mut(room) else {
            return false;
        };
        if !rm.members.insert(key.to_string()) {
            return false;
        }
        self.membership_epoch += 1;
        if let Some(u) = self.users.get_mut(key) {
            u.rooms.insert(room.to_string());
        }
        let members: Vec<String> = self.rooms[room].members.iter().cloned().collect();
        self.collect_conns(members.iter(), conn);
        let u = &self.users[key];
        let json = ServerFrame::Presence {
            room: Some(room),
            user: &u.name,
            nick: &u.nick,
            event: PresenceEvent::Join,
            last_seen: None,
        }
        .to_json();
        self.broadcast(&json, false);
        true
    }

    /// Sends `joined` with the ring as snapshot. Runs in one step of the single-threaded loop
    /// with the connection becoming a live recipient, so the next message broadcast to the room
    /// is exactly the one after the snapshot's last.
    pub(in crate::chat::core) fn send_joined(
        &mut self,
        conn: ConnId,
        room: &str,
        reference: Option<&str>,
    ) {
        if self.conn_user(conn).is_none() {
            return; // closed while the ring loaded
        }
        let rm = &self.rooms[room];
        let members: Vec<MemberInfo<'_>> = rm
            .members
            .iter()
            .filter_map(|k| self.users.get(k))
            .map(|u| MemberInfo {
                user: &u.name,
                nick: &u.nick,
                online: u.online(),
            })
            .collect();
        let history: Vec<&ChatMessage> = match &rm.ring {
            Ring::Warm(ring) => ring.iter().map(|m| &**m).collect(),
            _ => Vec::new(),
        };
        let json = ServerFrame::Joined {
            room,
            members,
            history,
            reference,
        }
        .to_json();
        self.send_json(conn, json);
    }

    pub(in crate::chat::core) fn leave(
        &mut self,
        conn: ConnId,
        key: &str,
        room: &str,
        r: Option<&str>,
    ) {
        if let Err((c, m)) = validate::room_name(room) {
            return self.error(conn, c, &m, r);
        }
        if !self.remove_member(room, key, conn) {
            return self.error(conn, ErrorCode::NotMember, "not a member", r);
        }
        self.write(Write::RemoveMember {
            room: room.to_string(),
            user_key: key.to_string(),
        });
        self.send(conn, &ServerFrame::Left { room, reference: r });
    }

    /// Takes `key` out of `room` in memory (a `leave` here, or one another node logged) and
    /// tells the remaining members and the leaver's connections, except `except` (which gets
    /// its own answer). Returns whether `key` was a member.
    pub(in crate::chat::core) fn remove_member(
        &mut self,
        room: &str,
        key: &str,
        except: ConnId,
    ) -> bool {
        let removed = self
            .rooms
            .get_mut(room)
            .is_some_and(|rm| rm.members.remove(key));
        if !removed {
            return false;
        }
        self.membership_epoch += 1;
        if let Some(u) = self.users.get_mut(key) {
            u.rooms.remove(room);
        }
        let mut keys: Vec<String> = self.rooms[room].members.iter().cloned().collect();
        keys.push(key.to_string());
        self.collect_conns(keys.iter(), except);
        if let Some(u) = self.users.get(key) {
            let json = ServerFrame::Presence {
                room: Some(room),
                user: &u.name,
                nick: &u.nick,
                event: PresenceEvent::Leave,
                last_seen: None,
            }
            .to_json();
            self.broadcast(&json, false);
        }
        self.maybe_unwatched.insert(room.to_string());
        true
    }

    /// Drops a room's join snapshot from memory once no member is online: the store has the
    /// same messages and the next join loads them (off the loop), so memory follows the rooms
    /// of online users rather than every room touched since start.
    pub(in crate::chat::core) fn cool_if_unwatched(&mut self, room: &str) {
        let Some(rm) = self.rooms.get_mut(room) else {
            return;
        };
        // A loading ring has joins waiting on it; only a warm one can go.
        if rm.is_warm() && !rm.members.iter().any(|m| self.online.contains(m)) {
            rm.ring = Ring::Cold;
        }
    }

    /// Whether `room`'s join snapshot is in memory (for tests).
    #[cfg(test)]
    pub(crate) fn ring_is_warm(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(Room::is_warm)
    }

    /// `rooms`: every room with member and online counts.
    pub(in crate::chat::core) fn list_rooms(&mut self, conn: ConnId, r: Option<&str>) {
        let rooms: Vec<RoomInfo<'_>> = self
            .rooms
            .iter()
            .map(|(name, room)| RoomInfo {
                name,
                members: room.members.len(),
                online: room
                    .members
                    .iter()
                    .filter(|m| self.online.contains(*m))
                    .count(),
            })
            .collect();
        let json = ServerFrame::Rooms {
            rooms,
            reference: r,
        }
        .to_json();
        self.send_json(conn, json);
    }

    /// `who`: a room's members with presence.
    pub(in crate::chat::core) fn who(&mut self, conn: ConnId, room: &str, r: Option<&str>) {
        if let Err((c, m)) = validate::room_name(room) {
            return self.error(conn, c, &m, r);
        }
        let Some(rm) = self.rooms.get(room) else {
            return self.error(conn, ErrorCode::NoSuchRoom, "no such room", r);
        };
        let members: Vec<WhoMember<'_>> = rm
            .members
            .iter()
            .filter_map(|k| self.users.get(k))
            .map(|u| WhoMember {
                user: &u.name,
                nick: &u.nick,
                online: u.online(),
                last_seen: u.last_seen,
            })
            .collect();
        let json = ServerFrame::Who {
            room,
            members,
            reference: r,
        }
        .to_json();
        self.send_json(conn, json);
    }
}
