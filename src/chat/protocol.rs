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
    },
    Dm {
        to: String,
        text: String,
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
const KNOWN_TYPES: [&str; 13] = [
    "register", "login", "resume", "logout", "join", "leave", "rooms", "who", "say", "dm",
    "history", "nick", "typing",
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
                Command::Say { room, text } => vec![room.as_str(), text.as_str()],
                Command::Dm { to, text } => vec![to.as_str(), text.as_str()],
                Command::Nick { nick } => vec![nick.as_str()],
                Command::History { room, with, .. } => {
                    room.iter().chain(with.iter()).map(|s| s.as_str()).collect()
                }
                Command::Typing { room, to } => {
                    room.iter().chain(to.iter()).map(|s| s.as_str()).collect()
                }
                Command::Logout { .. } | Command::Rooms {} => Vec::new(),
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

/// A chat message as stored and as sent (`message` frames, `history`, `joined.history`).
/// Exactly one of `room` / `to` is set.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub nick: String,
    pub text: String,
    pub ts: i64,
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

/// Every frame the server sends. Borrowed so building a frame never clones state.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        nick: &'a str,
        token: &'a str,
        rooms: Vec<&'a str>,
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
        let m = ChatMessage {
            id: 42,
            room: Some("rust".into()),
            from: "alice".into(),
            to: None,
            nick: "Ally".into(),
            text: "hi".into(),
            ts: 7,
        };
        let json = ServerFrame::Message(&m).to_json();
        assert_eq!(
            json,
            r#"{"type":"message","id":42,"room":"rust","from":"alice","nick":"Ally","text":"hi","ts":7}"#
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
