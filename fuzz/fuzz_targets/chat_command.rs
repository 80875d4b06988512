//! Arbitrary bytes into the chat command parser and field validators: nothing may panic.
//! Run: `cargo +nightly fuzz run chat_command` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;
use parlor::chat::protocol::{parse_client_frame, Command, ServerFrame};
use parlor::chat::validate;

fuzz_target!(|data: &[u8]| {
    match parse_client_frame(data) {
        Ok(frame) => {
            // Everything a parsed frame can carry goes through the same checks the service runs.
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
                Command::Logout {} | Command::Rooms {} => Vec::new(),
            };
            for s in strings {
                let _ = validate::user_name(s);
                let _ = validate::room_name(s);
                let _ = validate::nick(s);
                let _ = validate::password(s);
                let _ = validate::text(s, 4000);
                let _ = validate::nick_key(s);
            }
        }
        Err(e) => {
            // The error reply must serialize whatever the input was.
            let json = ServerFrame::Error {
                code: e.code,
                message: &e.message,
                reference: e.reference.as_deref(),
            }
            .to_json();
            assert!(json.starts_with('{'));
        }
    }
});
