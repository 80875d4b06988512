//! `parlor backup` while the server takes a flood of messages, then `parlor restore` into an
//! empty data directory: every message acknowledged before the backup started is in the copy.

mod chat_common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_common::{Client, Server, TempDir};
use serde_json::{json, Value};
use tungstenite::Message;

fn parlor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parlor"))
        .args(args)
        .output()
        .expect("run parlor")
}

#[test]
fn backup_during_a_flood_then_restore_keeps_every_acked_message() {
    let dir = TempDir::new("backup-src");
    let srv = Server::spawn(&dir.0, &["--rate-limit", "0"]);
    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..3)
        .map(|i| {
            let (addr, acked, stop) = (srv.addr.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Client::register(&addr, &format!("sender{i}"));
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let say = json!({"type":"say","room":"general","text":format!("{i}-{n}"),"ref":format!("{n}")});
                    c.ws.send(Message::text(say.to_string())).expect("send");
                    n += 1;
                    loop {
                        let v: Value = match c.ws.read().expect("read") {
                            Message::Text(t) => serde_json::from_str(&t).expect("json"),
                            _ => continue,
                        };
                        if v["type"] == "ack" {
                            acked.lock().unwrap().push(v["id"].as_i64().expect("id"));
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let before: Vec<i64> = acked.lock().unwrap().clone();
    let file = dir.0.with_extension("backup.db");
    let _ = std::fs::remove_file(&file);
    let data = dir.0.to_str().expect("utf8");
    let out = parlor(&["--data", data, "backup", file.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.starts_with("backed up "), "{said}");
    // The flood went on during the backup.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().expect("sender");
    }
    let after = acked.lock().unwrap().len();
    srv.stop();
    assert!(
        before.len() > 50,
        "messages acked before the backup: {}",
        before.len()
    );
    assert!(
        after > before.len(),
        "the server kept committing during the backup"
    );
    // Never over an existing file.
    let again = parlor(&["--data", data, "backup", file.to_str().expect("utf8")]);
    assert!(!again.status.success());

    let restored = TempDir::new("backup-dst");
    let target = restored.0.to_str().expect("utf8");
    let out = parlor(&["--data", target, "restore", file.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only into an empty data directory.
    let twice = parlor(&["--data", target, "restore", file.to_str().expect("utf8")]);
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already has a chat database"));

    let srv = Server::spawn(&restored.0, &["--query-rate", "0"]);
    let mut reader = Client::connect(&srv.addr);
    reader.send(json!({"type":"login","user":"sender0","password":"password123"}));
    reader.expect("welcome");
    let stored = reader.all_message_ids("general");
    let missing: Vec<&i64> = before.iter().filter(|id| !stored.contains(id)).collect();
    println!(
        "backup: {} acked before it started, {} acked by the end, {} in the restored copy",
        before.len(),
        after,
        stored.len()
    );
    assert!(
        missing.is_empty(),
        "acked before the backup but not restored: {missing:?}"
    );
    let _ = std::fs::remove_file(&file);
    srv.stop();
}
