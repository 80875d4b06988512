//! Close codes (RFC 6455 §7.4) and the rules for close frame payloads (§5.5.1).

use std::fmt;

/// A close status code. The named variants are the codes of RFC 6455 §7.4.1 and the IANA
/// registry that the server or its services use or recognise; [`CloseCode::Other`] carries any
/// other number (e.g. a 4000-range code a peer sent, echoed back). `From<u16>` maps a known
/// number to its named variant, and equality compares the numbers, so `Other(1000)` equals
/// `Normal`.
#[derive(Debug, Clone, Copy)]
pub enum CloseCode {
    /// 1000: normal closure (e.g. after `logout`).
    Normal,
    /// 1001: server going down or client navigating away.
    GoingAway,
    /// 1002: protocol violation.
    ProtocolError,
    /// 1003: data type the endpoint does not accept (binary on the chat endpoint).
    UnsupportedData,
    /// 1005: no status code in the close frame. Never sent; what an empty close counts as.
    NoStatusReceived,
    /// 1006: the connection ended without a close frame. Never sent.
    AbnormalClosure,
    /// 1007: text message (or close reason) that is not UTF-8.
    InvalidPayload,
    /// 1008: policy violation (a client that stops reading, or breaks a service's rules).
    PolicyViolation,
    /// 1009: message larger than the endpoint accepts.
    MessageTooBig,
    /// 1010: the client expected an extension the server did not negotiate.
    MandatoryExtension,
    /// 1011: unexpected server condition.
    InternalError,
    /// 1012: the server is restarting.
    ServiceRestart,
    /// 1013: try again later (the loop's `--memory-budget`).
    TryAgainLater,
    /// 1014: bad gateway.
    BadGateway,
    /// Any other code.
    Other(u16),
}

impl CloseCode {
    /// The number on the wire.
    pub const fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::UnsupportedData => 1003,
            CloseCode::NoStatusReceived => 1005,
            CloseCode::AbnormalClosure => 1006,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::MandatoryExtension => 1010,
            CloseCode::InternalError => 1011,
            CloseCode::ServiceRestart => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::BadGateway => 1014,
            CloseCode::Other(c) => c,
        }
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> CloseCode {
        match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1003 => CloseCode::UnsupportedData,
            1005 => CloseCode::NoStatusReceived,
            1006 => CloseCode::AbnormalClosure,
            1007 => CloseCode::InvalidPayload,
            1008 => CloseCode::PolicyViolation,
            1009 => CloseCode::MessageTooBig,
            1010 => CloseCode::MandatoryExtension,
            1011 => CloseCode::InternalError,
            1012 => CloseCode::ServiceRestart,
            1013 => CloseCode::TryAgainLater,
            1014 => CloseCode::BadGateway,
            c => CloseCode::Other(c),
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.as_u16()
    }
}

impl PartialEq for CloseCode {
    fn eq(&self, other: &CloseCode) -> bool {
        self.as_u16() == other.as_u16()
    }
}

impl Eq for CloseCode {}

impl std::hash::Hash for CloseCode {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_u16().hash(state);
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

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
pub fn parse_close_payload(payload: &[u8]) -> Result<CloseFrame<'_>, CloseCode> {
    match payload.len() {
        0 => Ok(CloseFrame {
            code: None,
            reason: "",
        }),
        1 => Err(CloseCode::ProtocolError),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_received(code) {
                return Err(CloseCode::ProtocolError);
            }
            let reason =
                std::str::from_utf8(&payload[2..]).map_err(|_| CloseCode::InvalidPayload)?;
            Ok(CloseFrame {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Builds a close payload, truncating `reason` on a char boundary so the control frame stays
/// within 125 bytes.
pub fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.as_u16().to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for n in [
            1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
            3000, 4999,
        ] {
            assert_eq!(CloseCode::from(n).as_u16(), n);
            assert_eq!(u16::from(CloseCode::from(n)), n);
        }
        assert_eq!(CloseCode::from(1008), CloseCode::PolicyViolation);
        assert_eq!(CloseCode::Other(1013), CloseCode::TryAgainLater);
        assert_ne!(CloseCode::Other(4000), CloseCode::Normal);
        assert_eq!(CloseCode::MessageTooBig.to_string(), "1009");
    }

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
        assert_eq!(parse_close_payload(&[0x03]), Err(CloseCode::ProtocolError));
        assert_eq!(parse_close_payload(&[0x03, 0xe8]).unwrap().code, Some(1000));
        assert_eq!(
            parse_close_payload(&[0x03, 0xed]),
            Err(CloseCode::ProtocolError)
        ); // 1005
        let mut bad = vec![0x03, 0xe8];
        bad.extend_from_slice(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80");
        assert_eq!(parse_close_payload(&bad), Err(CloseCode::InvalidPayload));
        let ok = parse_close_payload(b"\x03\xe8bye").unwrap();
        assert_eq!(ok.reason, "bye");
    }

    #[test]
    fn close_payload_truncates_on_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let p = close_payload(CloseCode::Normal, &long);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(close_payload(CloseCode::GoingAway, "bye"), b"\x03\xe9bye");
    }
}
