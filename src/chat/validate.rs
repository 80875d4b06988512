//! Field checks for protocol v1. Every check runs before anything is stored or broadcast.

use super::error::ErrorCode;

pub type Check = Result<(), (ErrorCode, String)>;

fn bad(msg: impl Into<String>) -> Check {
    Err((ErrorCode::BadRequest, msg.into()))
}

/// Account name: 1–32 of `[A-Za-z0-9_.-]` (unique case-insensitively; see [`user_key`]).
pub fn user_name(s: &str) -> Check {
    if s.is_empty() || s.len() > 32 {
        return bad("user must be 1-32 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return bad("user may contain only A-Z a-z 0-9 _ . -");
    }
    Ok(())
}

/// The case-insensitive identity of an account name (names are ASCII, so lowercase suffices).
pub fn user_key(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Room name: 1–32 of `[a-z0-9_-]`.
pub fn room_name(s: &str) -> Check {
    if s.is_empty() || s.len() > 32 {
        return bad("room must be 1-32 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    {
        return bad("room may contain only a-z 0-9 _ -");
    }
    Ok(())
}

/// Password: 8–1024 bytes. Too short is `weak_password`; too long is a limit (`bad_request`).
pub fn password(s: &str) -> Check {
    if s.len() < 8 {
        return Err((
            ErrorCode::WeakPassword,
            "password must be at least 8 bytes".into(),
        ));
    }
    if s.len() > 1024 {
        return bad("password must be at most 1024 bytes");
    }
    Ok(())
}

/// Characters that render invisibly or reorder text: allowing them in a nick would let one
/// user look like another even though the strings differ.
fn is_deceptive(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Nick: 1–32 printable characters. Leading/trailing whitespace is rejected rather than
/// trimmed, because the server never silently alters what a user chose.
pub fn nick(s: &str) -> Check {
    let n = s.chars().count();
    if n == 0 || n > 32 {
        return bad("nick must be 1-32 characters");
    }
    if s.chars().any(|c| c.is_control() || is_deceptive(c)) {
        return bad("nick may not contain control or invisible characters");
    }
    if s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
        return bad("nick may not start or end with whitespace");
    }
    Ok(())
}

/// Message text: 1–`max` characters (Unicode scalar values), never altered.
pub fn text(s: &str, max: usize) -> Check {
    if s.is_empty() {
        return bad("text must not be empty");
    }
    // Byte length bounds the char count from above: skip counting for short texts.
    if s.len() > max && s.chars().count() > max {
        return Err((
            ErrorCode::TooLong,
            format!("text is longer than {max} characters"),
        ));
    }
    Ok(())
}

/// Longest emoji a reaction may carry, in Unicode scalar values (flags and skin-toned or
/// joined sequences take several).
pub const MAX_EMOJI_CHARS: usize = 8;

/// A reaction's emoji: 1–8 scalar values, no whitespace or control characters. Which
/// sequences are "really" emoji is left to the clients: the bound is what protects the server.
pub fn emoji(s: &str) -> Check {
    let n = s.chars().count();
    if n == 0 || n > MAX_EMOJI_CHARS {
        return bad("emoji must be 1 to 8 characters");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("emoji must not contain whitespace or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_rules() {
        for ok in ["👍", "🎉", "👍🏽", "🏳️‍🌈", "x", "+1"] {
            assert!(emoji(ok).is_ok(), "{ok}");
        }
        for bad in ["", "👍 ", "a\nb", "123456789", "\u{7}"] {
            assert!(emoji(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(user_name("Alice_1.x-y").is_ok());
        assert!(user_name("").is_err());
        assert!(user_name(&"a".repeat(33)).is_err());
        assert!(user_name("al ice").is_err());
        assert!(room_name("rust-1_a").is_ok());
        assert!(room_name("Rust").is_err());
        assert!(room_name("").is_err());
    }

    #[test]
    fn nicks() {
        assert!(nick("Ally ✨").is_ok());
        assert!(nick(&"é".repeat(32)).is_ok());
        assert!(nick(&"é".repeat(33)).is_err());
        assert!(nick(" Ally").is_err());
        assert!(nick("Ally\n").is_err());
        assert!(nick("a\u{202E}b").is_err());
        assert!(nick("").is_err());
    }

    #[test]
    fn texts_and_passwords() {
        assert!(text("x", 4).is_ok());
        assert_eq!(text("", 4).unwrap_err().0, ErrorCode::BadRequest);
        assert!(text("éééé", 4).is_ok());
        assert_eq!(text("ééééé", 4).unwrap_err().0, ErrorCode::TooLong);
        assert_eq!(password("short").unwrap_err().0, ErrorCode::WeakPassword);
        assert!(password("longenough").is_ok());
        assert_eq!(
            password(&"x".repeat(1025)).unwrap_err().0,
            ErrorCode::BadRequest
        );
    }
}
