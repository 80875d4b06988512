//! Close codes (RFC 6455 §7.4) and the rules for close frame payloads (§5.5.1).

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// Server going down or client navigating away.
pub const GOING_AWAY: u16 = 1001;
/// Protocol violation.
pub const PROTOCOL_ERROR: u16 = 1002;
/// Data type the endpoint does not accept (binary on the chat endpoint).
pub const UNSUPPORTED_DATA: u16 = 1003;
/// Text message that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation (we use it for a client that stops reading).
pub const POLICY_VIOLATION: u16 = 1008;
/// Message larger than the endpoint accepts.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// Unexpected server condition.
pub const INTERNAL_ERROR: u16 = 1011;

/// Whether `code` may appear in a close frame received from a peer. 1004–1006 and 1015 are
/// reserved and must never be sent; 1016–2999 are unassigned; 3000–4999 are for libraries and
/// applications; 1012–1014 are registered with IANA (restart, try again later, bad gateway).
pub fn is_valid_received(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A parsed close frame payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// `None` for an empty payload (which means "no status code", 1005 to the application).
    pub code: Option<u16>,
    pub reason: &'a str,
}

/// Validates a received close payload: empty, or a valid code followed by a UTF-8 reason.
/// Errors carry the close code to fail the connection with.
pub fn parse_close_payload(payload: &[u8]) -> Result<CloseFrame<'_>, u16> {
    match payload.len() {
        0 => Ok(CloseFrame {
            code: None,
            reason: "",
        }),
        1 => Err(PROTOCOL_ERROR),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_received(code) {
                return Err(PROTOCOL_ERROR);
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| INVALID_PAYLOAD)?;
            Ok(CloseFrame {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Builds a close payload, truncating `reason` on a char boundary so the control frame stays
/// within 125 bytes.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_codes() {
        for c in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_received(c), "{c} should be valid");
        }
        for c in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_received(c), "{c} should be invalid");
        }
    }

    #[test]
    fn payload_rules() {
        assert_eq!(parse_close_payload(&[]).unwrap().code, None);
        assert_eq!(parse_close_payload(&[0x03]), Err(PROTOCOL_ERROR));
        assert_eq!(parse_close_payload(&[0x03, 0xe8]).unwrap().code, Some(1000));
        assert_eq!(parse_close_payload(&[0x03, 0xed]), Err(PROTOCOL_ERROR)); // 1005
        let mut bad = vec![0x03, 0xe8];
        bad.extend_from_slice(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80");
        assert_eq!(parse_close_payload(&bad), Err(INVALID_PAYLOAD));
        let ok = parse_close_payload(b"\x03\xe8bye").unwrap();
        assert_eq!(ok.reason, "bye");
    }

    #[test]
    fn close_payload_truncates_on_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let p = close_payload(1000, &long);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(close_payload(1001, "bye"), b"\x03\xe9bye");
    }
}
