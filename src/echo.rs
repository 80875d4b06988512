//! `/echo`: every message goes back to its sender with the same opcode (Autobahn and the
//! benchmarks use it). Off unless `--echo` is given. Echoes are unshared frames, so what a
//! client that does not read them makes the server hold counts against `--memory-budget`.

use crate::service::{ConnId, Message, Outbox, Service};

#[derive(Debug, Default)]
pub struct Echo;

impl Service for Echo {
    fn on_message(&mut self, out: &mut dyn Outbox, conn: ConnId, msg: Message<'_>) {
        match msg {
            Message::Text(t) => {
                out.send_text(conn, t);
            }
            Message::Binary(b) => {
                out.send_binary(conn, b);
            }
        }
    }
}
