//! `/echo`: every message goes back to its sender with the same opcode (Autobahn and the
//! benchmarks use it).

use crate::service::{ConnId, Message, Outbox, Service};
use crate::ws::frame::{encode_shared, OpCode};

#[derive(Debug, Default)]
pub struct Echo;

impl Service for Echo {
    fn on_message(&mut self, out: &mut dyn Outbox, conn: ConnId, msg: Message<'_>) {
        match msg {
            Message::Text(t) => {
                out.send_text(conn, t);
            }
            Message::Binary(b) => {
                out.send_frame(conn, &encode_shared(OpCode::Binary, b));
            }
        }
    }
}
