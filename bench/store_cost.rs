//! The SQLite store thread's CPU per message, as the fan-out benchmark loads it: batches of 32
//! room messages with retry refs (one loop turn's worth at window 32), each waited for before
//! the next (a closed loop, like the acks). Prints the figure; compare two builds by running
//! each several times alternately and taking the lowest of each (the CPU time is the store
//! thread's own, from `/proc/self/task/*/schedstat`, so other load moves it less than wall
//! time, but it is still a shared machine).
//!
//!     cargo bench --bench store_cost
//!
//! Options (environment): BATCHES (3000), BATCH (32).

use std::time::{Duration, Instant};

use parlor::chat::protocol::ChatMessage;
use parlor::chat::store::{open_sqlite, Durability, Store, StoreEvent, StoreReq, Write};

/// CPU time of the `chat-store` thread so far, in nanoseconds.
fn store_cpu_ns() -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let t = t.expect("task").path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() == "chat-store" {
            let s = std::fs::read_to_string(t.join("schedstat")).unwrap_or_default();
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `batches` batches and waits for each commit.
fn run(store: &mut dyn Store, batches: u64, batch: u64, next_id: &mut i64, seq: &mut u64) {
    for _ in 0..batches {
        let reqs = (0..batch)
            .map(|_| {
                *seq += 1;
                *next_id += 1;
                // The bench's text: run nonce, publisher, sequence, send time.
                StoreReq::Write(Write::InsertMessage {
                    msg: ChatMessage {
                        id: *next_id,
                        room: Some("bench".into()),
                        from: "pub0".into(),
                        nick: "pub0".into(),
                        text: format!("k3j4h5 0 {seq} {}", 1_764_590_000_000_000 + *seq * 37),
                        ts: 1_764_590_000_000 + *seq as i64,
                        ..ChatMessage::default()
                    },
                    dm: None,
                    dedup: Some(("pub0".into(), format!("r{seq}"))),
                })
            })
            .collect();
        store.submit(reqs);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match store.try_event() {
                Some(StoreEvent::Committed { .. }) => break,
                Some(_) => {}
                None => {
                    assert!(Instant::now() < deadline, "no commit in 30 s");
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }
}

fn main() {
    let batches = env("BATCHES", 3000);
    let batch = env("BATCH", 32);
    let dir = std::env::temp_dir().join(format!("parlor-store-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut store, loaded, _) =
        open_sqlite(&dir, Durability::Normal, 1 << 40, 0, Default::default()).expect("open");
    let mut next_id = loaded.next_id;
    let mut seq = 0;
    // Warm-up: the first pages, the prepared statements.
    run(store.as_mut(), batches / 10, batch, &mut next_id, &mut seq);
    let before = store_cpu_ns();
    run(store.as_mut(), batches, batch, &mut next_id, &mut seq);
    let used = store_cpu_ns() - before;
    let messages = batches * batch;
    println!(
        "store thread: {} ns CPU per message ({messages} messages in batches of {batch})",
        used / messages
    );
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
