//! How long `catchup` takes to bring a client up to date over 10,000 events (messages, edits,
//! reactions, deletes), against a running server. Prints figures; asserts nothing about time.
//!
//!     bench/catchup.sh                       # starts a server, runs this, stops it
//!     cargo run --release --example catchup_bench -- 127.0.0.1:8080 [EVENTS] [ROUNDS]
//!
//! The server must allow the load: `--rate-limit 0 --query-rate 0`.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).expect("send");
}

fn recv(ws: &mut Ws) -> Value {
    loop {
        if let Message::Text(t) = ws.read().expect("read") {
            return serde_json::from_str(&t).expect("json");
        }
    }
}

/// Reads until the reply carrying `r`.
fn reply(ws: &mut Ws, r: &str) -> Value {
    loop {
        let v = recv(ws);
        if v["ref"] == r {
            return v;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let events: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);

    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).expect("connect");
    let name = format!("catchup{}", std::process::id());
    send(
        &mut ws,
        json!({"type":"register","user":name,"password":"catchup-bench-pw","ref":"r"}),
    );
    let welcome = reply(&mut ws, "r");
    let since = welcome["seq"]
        .as_i64()
        .expect("welcome seq (a server with catchup)");
    let room = format!("cb{}", std::process::id());
    send(&mut ws, json!({"type":"join","room":room,"ref":"j"}));
    reply(&mut ws, "j");

    // The events: 40 % messages, 30 % reactions, 20 % edits, 10 % deletes, in batches of 100
    // pipelined requests.
    let t0 = Instant::now();
    let mut ids: Vec<i64> = Vec::new();
    // Requests sent, and events they made (an ack: a new message, or a change with a seq;
    // errors and reactions that were already there make none).
    let (mut made, mut logged) = (0, 0);
    let emoji = ["👍", "🎉", "👀", "❤️", "😂"];
    while logged < events {
        let batch = 100.min(events - logged);
        for i in 0..batch {
            let n = made + i;
            let r = format!("e{n}");
            let v = match (n % 10, ids.len()) {
                (_, 0) | (0..=3, _) => {
                    json!({"type":"say","room":room,"text":format!("message {n}"),"ref":r})
                }
                (4..=6, k) => {
                    json!({"type":"react","id":ids[n % k],"emoji":emoji[n % 5],"on":true,"ref":r})
                }
                (7 | 8, k) => {
                    json!({"type":"edit","id":ids[n % k],"text":format!("edit {n}"),"ref":r})
                }
                (_, k) => json!({"type":"delete","id":ids[(n * 7) % k],"ref":r}),
            };
            send(&mut ws, v);
        }
        // Errors (a change to a deleted message) come at once, acks after their commit: the
        // replies of a batch arrive in any order.
        let mut replies = std::collections::HashMap::new();
        while replies.len() < batch {
            let v = recv(&mut ws);
            if let Some(r) = v["ref"].as_str().filter(|r| r.starts_with('e')) {
                replies.insert(r.to_string(), v);
            }
        }
        for i in 0..batch {
            let v = &replies[&format!("e{}", made + i)];
            if v["type"] == "ack"
                && (v.get("seq").is_some() || !ids.contains(&v["id"].as_i64().unwrap_or(-1)))
            {
                logged += 1;
            }
            if v["type"] == "ack" && v.get("seq").is_none() {
                if let Some(id) = v["id"].as_i64() {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
        made += batch;
    }
    let make = t0.elapsed();
    println!(
        "made {logged} events ({} messages) with {made} requests in {:.2} s ({:.0} requests/s, \
         one connection, 100 pipelined)",
        ids.len(),
        make.as_secs_f64(),
        made as f64 / make.as_secs_f64()
    );

    let mut totals = Vec::new();
    let mut pages_ms = Vec::new();
    let mut got = 0;
    for round in 0..rounds {
        let start = Instant::now();
        let mut cursor = since;
        got = 0;
        loop {
            let p0 = Instant::now();
            let r = format!("k{round}-{cursor}");
            send(
                &mut ws,
                json!({"type":"catchup","since":cursor,"limit":1000,"ref":r}),
            );
            let page = reply(&mut ws, &r);
            pages_ms.push(p0.elapsed().as_secs_f64() * 1000.0);
            got += page["events"].as_array().map_or(0, Vec::len);
            cursor = page["seq"].as_i64().expect("seq");
            if page["more"] != true {
                break;
            }
        }
        totals.push(start.elapsed());
    }
    totals.sort();
    pages_ms.sort_by(|a, b| a.total_cmp(b));
    let median = totals[totals.len() / 2];
    let p = |q: f64| pages_ms[((pages_ms.len() - 1) as f64 * q) as usize];
    println!(
        "catchup of {got} events (limit 1000 per page): median {:.1} ms over {rounds} rounds \
         (min {:.1}, max {:.1}), {:.0} events/s; per page p50 {:.1} ms, p99 {:.1} ms",
        ms(median),
        ms(totals[0]),
        ms(totals[totals.len() - 1]),
        got as f64 / median.as_secs_f64(),
        p(0.5),
        p(0.99)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
