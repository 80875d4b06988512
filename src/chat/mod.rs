//! The chat service (protocol v1 on `/ws`). See `docs/PROTOCOL.md`.

/// Chat flags, flattened into [`crate::config::Config`].
#[derive(clap::Args, Debug, Clone)]
pub struct ChatConfig {
    /// Largest WebSocket message accepted on /ws, in bytes (larger closes with 1009).
    #[arg(long, default_value_t = 64 * 1024)]
    pub chat_max_message: usize,
}
