//! `nick`: display names, refused when they look like someone else's.

use crate::chat::confusable::skeleton_keys;
use crate::chat::core::{extend_conns_of, Hub};
use crate::chat::protocol::{ErrorCode, ServerFrame};
use crate::chat::store::Write;
use crate::chat::validate;
use crate::service::ConnId;

impl Hub {
    pub(in crate::chat::core) fn nick(
        &mut self,
        conn: ConnId,
        key: &str,
        nick: String,
        r: Option<&str>,
    ) {
        if let Err((c, m)) = validate::nick(&nick) {
            return self.error(conn, c, &m, r);
        }
        // Another account's name, or another user's nick (online or not), or anything that
        // looks like one of them: nobody may pass as someone else.
        let skeleton = skeleton_keys(&nick);
        let taken = self.name_skeletons.held_by_other(&skeleton, key)
            || self.nick_skeletons.held_by_other(&skeleton, key);
        if taken {
            return self.error(conn, ErrorCode::NickTaken, "nick is taken", r);
        }
        // A nick change is broadcast widely: it costs a token like a message.
        if !self.take_token(key, self.now.mono) {
            return self.error(conn, ErrorCode::RateLimited, "changing nick too fast", r);
        }
        if !self.users.contains_key(key) {
            return;
        }
        self.write(Write::SetNick {
            key: key.to_string(),
            nick: nick.clone(),
        });
        self.change_nick(key, &nick, &skeleton, conn);
        let name = self.users[key].name.clone();
        self.send(
            conn,
            &ServerFrame::Nick {
                user: &name,
                nick: &nick,
                reference: r,
            },
        );
    }

    /// Gives `key` the nick `nick` (whose look-alike keys are `skeleton`) in memory and tells
    /// room sharers, DM partners and the user's other connections (each connection once,
    /// `skip` excepted). A nick decided here and one another node decided (cluster mode) take
    /// the same path.
    pub(in crate::chat::core) fn change_nick(
        &mut self,
        key: &str,
        nick: &str,
        skeleton: &[String],
        skip: ConnId,
    ) {
        let Some(u) = self.users.get_mut(key) else {
            return;
        };
        self.nick_skeletons.remove(&skeleton_keys(&u.nick), key);
        self.nick_skeletons.insert(skeleton, key);
        u.nick = nick.to_string();
        let mut hearers: Vec<String> = u.dm_partners.iter().cloned().collect();
        hearers.push(key.to_string());
        self.collect_sharer_conns(key, skip);
        extend_conns_of(&mut self.scratch, &self.users, hearers.iter(), skip);
        self.scratch.sort_unstable();
        self.scratch.dedup();
        let json = ServerFrame::Nick {
            user: &self.users[key].name,
            nick,
            reference: None,
        }
        .to_json();
        self.broadcast(&json, false);
    }
}
