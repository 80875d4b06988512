//! One file per command family. Each is an `impl Hub` block: the commands of that family and
//! the results that complete them.

pub mod accounts;
pub mod auth;
pub mod changes;
pub mod cluster;
pub mod history;
pub mod messages;
pub mod profile;
pub mod reading;
pub mod rooms;
pub mod sessions;
pub mod typing;
