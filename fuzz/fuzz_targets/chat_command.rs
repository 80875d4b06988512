//! The chat command parser on arbitrary bytes: see `parlor::chat::protocol::check_client_frame`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| parlor::chat::protocol::check_client_frame(data));
