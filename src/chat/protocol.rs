//! Protocol v1 wire types: what clients send ([`ClientFrame`]) and what the server sends
//! ([`ServerFrame`]). Pure data and parsing; no state. See `docs/PROTOCOL.md`.

use serde::{Deserialize, Serialize};

/// Longest `ref` a client may attach; longer ones are a `bad_request`.
pub const MAX_REF_CHARS: usize = 64;

pub use super::error::ErrorCode;

/// The command part of a client frame, selected by `type`. Unknown fields are ignored so
/// clients may send newer optional fields to an older server.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Register {
        user: String,
        password: String,
    },
    Login {
        user: String,
        password: String,
    },
    Resume {
        token: String,
    },
    Logout {
        /// Revoke every token of the user and close all their connections.
        #[serde(default)]
        all: bool,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Rooms {},
    Who {
        room: String,
    },
    Say {
        room: String,
        text: String,
        #[serde(default)]
        reply_to: Option<i64>,
    },
    Dm {
        to: String,
        text: String,
        #[serde(default)]
        reply_to: Option<i64>,
    },
    Edit {
        id: i64,
        text: String,
    },
    Delete {
        id: i64,
    },
    React {
        id: i64,
        emoji: String,
        on: bool,
    },
    Catchup {
        since: i64,
        #[serde(default)]
        limit: Option<u32>,
    },
    History {
        #[serde(default)]
        room: Option<String>,
        #[serde(default)]
        with: Option<String>,
        #[serde(default)]
        before: Option<i64>,
        #[serde(default)]
        after: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Nick {
        nick: String,
    },
    Typing {
        #[serde(default)]
        room: Option<String>,
        #[serde(default)]
        to: Option<String>,
    },
}

/// The `type` values [`Command`] knows; anything else is `unknown_type`.
const KNOWN_TYPES: [&str; 17] = [
    "register", "login", "resume", "logout", "join", "leave", "rooms", "who", "say", "dm",
    "history", "nick", "typing", "edit", "delete", "react", "catchup",
];

/// A parsed client frame: the command plus the optional `ref` to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub reference: Option<String>,
    pub command: Command,
}

/// Why a client frame was rejected, with the `ref` to echo when one could be recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<String>,
}

/// Parses one client frame. Pure and panic-free on any input (a fuzz target calls it).
///
/// Parsing goes through a `serde_json::Value` first so that `ref` can be recovered even when the
/// rest of the frame is invalid: a client correlating errors needs it most exactly then.
pub fn parse_client_frame(bytes: &[u8]) -> Result<ClientFrame, ParseError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ParseError {
        code: ErrorCode::BadJson,
        message: format!("invalid JSON: {e}"),
        reference: None,
    })?;
    let obj = match value.as_object() {
        Some(o) => o,
        None => {
            return Err(ParseError {
                code: ErrorCode::BadRequest,
                message: "a frame must be a JSON object".into(),
                reference: None,
            })
        }
    };
    let reference = match obj.get("ref") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.chars().count() <= MAX_REF_CHARS => Some(s.clone()),
        Some(_) => {
            return Err(ParseError {
                code: ErrorCode::BadRequest,
                message: format!("ref must be a string of at most {MAX_REF_CHARS} characters"),
                reference: None,
            })
        }
    };
    let bad = |code, message: String| ParseError {
        code,
        message,
        reference: reference.clone(),
    };
    match obj.get("type") {
        Some(serde_json::Value::String(t)) => {
            if !KNOWN_TYPES.contains(&t.as_str()) {
                return Err(bad(
                    ErrorCode::UnknownType,
                    format!("unknown type {:?}", truncate(t, 64)),
                ));
            }
        }
        Some(_) => return Err(bad(ErrorCode::BadRequest, "type must be a string".into())),
        None => return Err(bad(ErrorCode::BadRequest, "missing field `type`".into())),
    }
    match Command::deserialize(value) {
        Ok(command) => Ok(ClientFrame { reference, command }),
        Err(e) => Err(bad(ErrorCode::BadRequest, e.to_string())),
    }
}

/// The fuzz property of the chat command parser (the `chat_command` target calls this): any
/// bytes parse to a frame or a typed error without panicking; every string a frame carries
/// goes through the service's validators; an error reply always serializes, its `ref` obeys
/// the limit, and a `bad_json` never claims a `ref`.
pub fn check_client_frame(bytes: &[u8]) {
    match parse_client_frame(bytes) {
        Ok(frame) => {
            if let Some(r) = &frame.reference {
                assert!(r.chars().count() <= MAX_REF_CHARS);
            }
            let strings: Vec<&str> = match &frame.command {
                Command::Register { user, password } | Command::Login { user, password } => {
                    vec![user.as_str(), password.as_str()]
                }
                Command::Resume { token } => vec![token.as_str()],
                Command::Join { room } | Command::Leave { room } | Command::Who { room } => {
                    vec![room.as_str()]
                }
                Command::Say { room, text, .. } => vec![room.as_str(), text.as_str()],
                Command::Dm { to, text, .. } => vec![to.as_str(), text.as_str()],
                Command::Edit { text, .. } => vec![text.as_str()],
                Command::React { emoji, .. } => {
                    let _ = super::validate::emoji(emoji);
                    vec![emoji.as_str()]
                }
                Command::Nick { nick } => vec![nick.as_str()],
                Command::History { room, with, .. } => {
                    room.iter().chain(with.iter()).map(|s| s.as_str()).collect()
                }
                Command::Typing { room, to } => {
                    room.iter().chain(to.iter()).map(|s| s.as_str()).collect()
                }
                Command::Logout { .. }
                | Command::Rooms {}
                | Command::Delete { .. }
                | Command::Catchup { .. } => Vec::new(),
            };
            for s in strings {
                let _ = super::validate::user_name(s);
                let _ = super::validate::room_name(s);
                let _ = super::validate::nick(s);
                let _ = super::validate::password(s);
                let _ = super::validate::text(s, 4000);
                let _ = super::confusable::skeleton_keys(s);
            }
        }
        Err(e) => {
            if e.code == ErrorCode::BadJson {
                assert!(e.reference.is_none());
            }
            if let Some(r) = &e.reference {
                assert!(r.chars().count() <= MAX_REF_CHARS);
            }
            let json = ServerFrame::Error {
                code: e.code,
                message: &e.message,
                reference: e.reference.as_deref(),
            }
            .to_json();
            let back: serde_json::Value =
                serde_json::from_str(&json).expect("error frame is valid JSON");
            assert_eq!(back["code"], e.code.as_str());
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A chat message as stored and as sent (`message` frames, `history`, `joined.history`,
/// `catchup`), in its current state. Exactly one of `room` / `to` is set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatMessage {
    pub id: i64,
    pub room: Option<String>,
    pub from: String,
    pub to: Option<String>,
    pub nick: String,
    /// Empty once deleted (and then not serialized): a live message's text is never empty.
    pub text: String,
    pub ts: i64,
    pub reply_to: Option<i64>,
    pub edited_ts: Option<i64>,
    pub deleted: bool,
    /// Emoji in the order first used, each with its users in the order they reacted.
    pub reactions: Vec<Reaction>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    pub emoji: String,
    pub users: Vec<String>,
}

impl ChatMessage {
    /// Adds or removes `user`'s `emoji`; returns whether anything changed.
    pub fn set_reaction(&mut self, user: &str, emoji: &str, on: bool) -> bool {
        let pos = self.reactions.iter().position(|r| r.emoji == emoji);
        match (pos, on) {
            (Some(i), true) => {
                let users = &mut self.reactions[i].users;
                if users.iter().any(|u| u == user) {
                    return false;
                }
                users.push(user.to_string());
            }
            (None, true) => self.reactions.push(Reaction {
                emoji: emoji.to_string(),
                users: vec![user.to_string()],
            }),
            (Some(i), false) => {
                let users = &mut self.reactions[i].users;
                let Some(u) = users.iter().position(|u| u == user) else {
                    return false;
                };
                users.remove(u);
                if users.is_empty() {
                    self.reactions.remove(i);
                }
            }
            (None, false) => return false,
        }
        true
    }

    /// The message as deleted: no text, no reactions.
    pub fn mark_deleted(&mut self) {
        self.deleted = true;
        self.text = String::new();
        self.reactions.clear();
    }
}

/// The wire form. `seq` is the message's place in the change log, which for a message is its
/// `id` (see `docs/PROTOCOL.md`, "seq"); optional fields appear only when set.
impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        if let Some(room) = &self.room {
            m.serialize_entry("room", room)?;
        }
        m.serialize_entry("from", &self.from)?;
        if let Some(to) = &self.to {
            m.serialize_entry("to", to)?;
        }
        m.serialize_entry("nick", &self.nick)?;
        if !self.deleted {
            m.serialize_entry("text", &self.text)?;
        }
        m.serialize_entry("ts", &self.ts)?;
        m.serialize_entry("seq", &self.id)?;
        if let Some(r) = self.reply_to {
            m.serialize_entry("reply_to", &r)?;
        }
        if let Some(e) = self.edited_ts {
            m.serialize_entry("edited_ts", &e)?;
        }
        if self.deleted {
            m.serialize_entry("deleted", &true)?;
        }
        if !self.reactions.is_empty() {
            m.serialize_entry("reactions", &self.reactions)?;
        }
        m.end()
    }
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MemberInfo<'a> {
    pub user: &'a str,
    pub nick: &'a str,
    pub online: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct WhoMember<'a> {
    pub user: &'a str,
    pub nick: &'a str,
    pub online: bool,
    /// Last time the user's last connection closed (ms); `null` if never recorded.
    pub last_seen: Option<i64>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RoomInfo<'a> {
    pub name: &'a str,
    pub members: usize,
    pub online: usize,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    Online,
    Offline,
    Join,
    Leave,
}

/// Where a change frame belongs: `room`, or for a DM its author (`from`) and the other person
/// (`to`), as in the message itself.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct ConvRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<&'a str>,
}

impl<'a> ConvRef<'a> {
    pub fn of(msg: &'a ChatMessage) -> ConvRef<'a> {
        match &msg.room {
            Some(room) => ConvRef {
                room: Some(room),
                from: None,
                to: None,
            },
            None => ConvRef {
                room: None,
                from: Some(&msg.from),
                to: msg.to.as_deref(),
            },
        }
    }
}

/// Every frame the server sends. Borrowed so building a frame never clones state.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        nick: &'a str,
        token: &'a str,
        rooms: Vec<&'a str>,
        /// The newest change-log number handed out (see `catchup`).
        seq: i64,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Joined {
        room: &'a str,
        members: Vec<MemberInfo<'a>>,
        history: Vec<&'a ChatMessage>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Left {
        room: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        user: &'a str,
        nick: &'a str,
        event: PresenceEvent,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_seen: Option<i64>,
    },
    Rooms {
        rooms: Vec<RoomInfo<'a>>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Who {
        room: &'a str,
        members: Vec<WhoMember<'a>>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Message(&'a ChatMessage),
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        id: i64,
        ts: i64,
        /// The change's place in the log (edits, deletes, reactions that changed something).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<i64>,
    },
    Edited {
        id: i64,
        #[serde(flatten)]
        conv: ConvRef<'a>,
        text: &'a str,
        edited_ts: i64,
        seq: i64,
    },
    Deleted {
        id: i64,
        #[serde(flatten)]
        conv: ConvRef<'a>,
        seq: i64,
    },
    Reaction {
        id: i64,
        #[serde(flatten)]
        conv: ConvRef<'a>,
        user: &'a str,
        emoji: &'a str,
        on: bool,
        seq: i64,
    },
    Catchup {
        /// The events, each already a complete frame (JSON object).
        events: Vec<&'a serde_json::value::RawValue>,
        seq: i64,
        more: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    History {
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        with: Option<&'a str>,
        messages: Vec<&'a ChatMessage>,
        more: bool,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Nick {
        user: &'a str,
        nick: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Typing {
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<&'a str>,
        user: &'a str,
        nick: &'a str,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    /// Serializes to JSON. Our frames contain only strings, numbers and bools, for which
    /// serde_json cannot fail; the fallback keeps this total anyway.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"serialize: {e}"}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let cases = [
            r#"{"type":"register","user":"a","password":"p"}"#,
            r#"{"type":"login","user":"a","password":"p"}"#,
            r#"{"type":"resume","token":"t"}"#,
            r#"{"type":"logout"}"#,
            r#"{"type":"join","room":"r"}"#,
            r#"{"type":"leave","room":"r"}"#,
            r#"{"type":"rooms"}"#,
            r#"{"type":"who","room":"r"}"#,
            r#"{"type":"say","room":"r","text":"x"}"#,
            r#"{"type":"dm","to":"b","text":"x"}"#,
            r#"{"type":"history","room":"r","before":3,"limit":2}"#,
            r#"{"type":"nick","nick":"N"}"#,
            r#"{"type":"typing","to":"b"}"#,
            r#"{"type":"say","room":"r","text":"x","reply_to":4}"#,
            r#"{"type":"edit","id":4,"text":"y"}"#,
            r#"{"type":"delete","id":4}"#,
            r#"{"type":"react","id":4,"emoji":"👍","on":true}"#,
            r#"{"type":"catchup","since":0,"limit":10}"#,
        ];
        for c in cases {
            assert!(parse_client_frame(c.as_bytes()).is_ok(), "{c}");
        }
    }

    #[test]
    fn errors_echo_ref() {
        let e = parse_client_frame(br#"{"type":"say","ref":"r1"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.reference.as_deref(), Some("r1"));
        let e = parse_client_frame(br#"{"type":"fly","ref":"r2"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert_eq!(e.reference.as_deref(), Some("r2"));
        let e = parse_client_frame(b"{nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadJson);
        let e = parse_client_frame(br#"[1]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let long = "x".repeat(65);
        let e = parse_client_frame(format!(r#"{{"type":"rooms","ref":"{long}"}}"#).as_bytes())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.reference, None);
        let e = parse_client_frame(br#"{"type":"history","room":"r","limit":-1,"ref":"q"}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.reference.as_deref(), Some("q"));
    }

    #[test]
    fn message_frame_shape() {
        let mut m = ChatMessage {
            id: 42,
            room: Some("rust".into()),
            from: "alice".into(),
            to: None,
            nick: "Ally".into(),
            text: "hi".into(),
            ts: 7,
            ..ChatMessage::default()
        };
        let json = ServerFrame::Message(&m).to_json();
        assert_eq!(
            json,
            r#"{"type":"message","id":42,"room":"rust","from":"alice","nick":"Ally","text":"hi","ts":7,"seq":42}"#
        );
        m.reply_to = Some(41);
        m.edited_ts = Some(9);
        assert!(m.set_reaction("bob", "👍", true));
        assert!(!m.set_reaction("bob", "👍", true), "idempotent");
        assert!(m.set_reaction("carol", "👍", true));
        assert!(m.set_reaction("bob", "🎉", true));
        assert!(m.set_reaction("bob", "🎉", false));
        assert!(!m.set_reaction("bob", "🎉", false));
        assert_eq!(
            ServerFrame::Message(&m).to_json(),
            r#"{"type":"message","id":42,"room":"rust","from":"alice","nick":"Ally","text":"hi","ts":7,"seq":42,"reply_to":41,"edited_ts":9,"reactions":[{"emoji":"👍","users":["bob","carol"]}]}"#
        );
        m.mark_deleted();
        assert_eq!(
            ServerFrame::Message(&m).to_json(),
            r#"{"type":"message","id":42,"room":"rust","from":"alice","nick":"Ally","ts":7,"seq":42,"reply_to":41,"edited_ts":9,"deleted":true}"#
        );
        let dm = ChatMessage {
            id: 5,
            from: "alice".into(),
            to: Some("bob".into()),
            ..ChatMessage::default()
        };
        assert_eq!(
            ServerFrame::Deleted {
                id: 5,
                conv: ConvRef::of(&dm),
                seq: 6
            }
            .to_json(),
            r#"{"type":"deleted","id":5,"from":"alice","to":"bob","seq":6}"#
        );
    }

    /// A cheap stand-in for the fuzz target in every test run: random bytes and random
    /// mutations of valid frames.
    #[test]
    fn random_inputs_never_panic() {
        let seeds: [&[u8]; 3] = [
            br#"{"type":"say","room":"rust","text":"hi","ref":"c1"}"#,
            br#"{"type":"history","with":"bob","before":9,"after":1,"limit":200}"#,
            br#"{"type":"register","user":"a","password":"pppppppp"}"#,
        ];
        let mut rnd = [0u8; 4096];
        for round in 0..2000 {
            getrandom::getrandom(&mut rnd).expect("rng");
            let seed = seeds[round % seeds.len()];
            let mut input = seed.to_vec();
            // Flip a few bytes and truncate somewhere.
            for k in 0..4 {
                let pos = rnd[k] as usize % input.len();
                input[pos] = rnd[k + 4];
            }
            input.truncate(1 + rnd[8] as usize % input.len());
            check_client_frame(&input);
            let n = rnd[9] as usize * 16 % rnd.len();
            check_client_frame(&rnd[..n]);
        }
    }

    /// The committed seeds of the `chat_command` fuzz target hold the property too.
    #[test]
    fn fuzz_seeds_pass_the_check() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/chat_command");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("seed dir") {
            let path = entry.expect("entry").path();
            check_client_frame(&std::fs::read(&path).expect("seed"));
            n += 1;
        }
        assert!(n >= 10, "seeds in {}", dir.display());
    }

    #[test]
    fn never_panics_on_junk() {
        for s in [
            &b"\xff\xfe"[..],
            b"",
            b"null",
            b"{\"type\":null}",
            b"{\"type\":\"say\",\"room\":1,\"text\":[]}",
            b"{\"type\":\"history\",\"before\":1e400}",
        ] {
            let _ = parse_client_frame(s);
        }
    }
}
