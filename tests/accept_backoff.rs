//! Running out of file descriptors must not make the loop spin, and accepting must resume
//! once descriptors are free again. The server runs with `ulimit -n 48`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields after "pid (comm) ": state is index 0, utime 11, stime 12.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn emfile_does_not_spin_and_accepting_resumes() {
    let data = std::env::temp_dir().join(format!("parlor-emfile-{}", std::process::id()));
    let cmd = format!(
        "ulimit -n 48 && exec {} --listen 127.0.0.1:0 --www /nonexistent --data {} --log-level error",
        env!("CARGO_BIN_EXE_parlor"),
        data.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let server = Server(child);
    let addr = line
        .trim()
        .strip_prefix("parlor listening on ")
        .expect("listening line")
        .to_string();
    let pid = server.0.id();

    // Hold more idle connections than the server has descriptors for.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(&addr).expect("connect (kernel backlog accepts)"));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_ticks(pid) - before;
    let ticks_per_sec = 100; // USER_HZ on Linux
    let spent = used as f64 / ticks_per_sec as f64;
    assert!(
        spent < 0.5 * t0.elapsed().as_secs_f64(),
        "server used {spent:.2} s CPU in {:?} while out of descriptors: it is spinning",
        t0.elapsed()
    );

    // Free the descriptors; the backlog drains and new requests are served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(&addr, "/healthz") {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "server never recovered: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // And the backoff path really ran: accept() failed at least once.
    let metrics = get(&addr, "/metrics").expect("metrics");
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("parlor_accept_errors_total "))
        .expect("accept_errors metric")
        .parse()
        .unwrap();
    assert!(
        errors > 0,
        "the test never ran the server out of descriptors"
    );
    let _ = std::fs::remove_dir_all(&data);
}
