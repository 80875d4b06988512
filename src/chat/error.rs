//! The chat's error codes: what `error` frames carry, and what field checks return.
//! Its own module so that `validate` (which returns them) and `protocol` (which checks frames
//! with `validate`) do not depend on each other.

use serde::Serialize;

/// Every error code the server sends. The string form is the wire form.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    BadRequest,
    Unauthenticated,
    AuthFailed,
    UserTaken,
    WeakPassword,
    NotMember,
    NoSuchUser,
    TooLong,
    RateLimited,
    NickTaken,
    /// Extension: `who` for a room that was never created.
    NoSuchRoom,
    /// Extension: the store failed to commit; the request had no effect.
    Internal,
    /// `register` on a server started with `--registration closed`.
    RegistrationClosed,
    /// Extension: edit/delete/react of a message that does not exist, cannot be seen by the
    /// asker, or was deleted (one answer for all, so nothing leaks).
    NotFound,
    /// Extension: edit/delete of another user's message.
    Forbidden,
    /// `login` or `resume` of an account an operator disabled (`parlor user disable`); also
    /// sent to its open connections before they are closed.
    AccountDisabled,
    /// Cluster mode: the database cannot be reached; the request had no effect. Retry later
    /// (with the same `ref`: a message that did get stored is acked, not stored twice).
    Unavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::AuthFailed,
        ErrorCode::UserTaken,
        ErrorCode::WeakPassword,
        ErrorCode::NotMember,
        ErrorCode::NoSuchUser,
        ErrorCode::TooLong,
        ErrorCode::RateLimited,
        ErrorCode::NickTaken,
        ErrorCode::NoSuchRoom,
        ErrorCode::Internal,
        ErrorCode::RegistrationClosed,
        ErrorCode::NotFound,
        ErrorCode::Forbidden,
        ErrorCode::AccountDisabled,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::UserTaken => "user_taken",
            ErrorCode::WeakPassword => "weak_password",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NoSuchUser => "no_such_user",
            ErrorCode::TooLong => "too_long",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NickTaken => "nick_taken",
            ErrorCode::NoSuchRoom => "no_such_room",
            ErrorCode::Internal => "internal",
            ErrorCode::RegistrationClosed => "registration_closed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::AccountDisabled => "account_disabled",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    pub fn index(self) -> usize {
        ErrorCode::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
