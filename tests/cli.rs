//! The binary's command line: `--help`, bad flags, and start-up failures.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn help_lists_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .arg("--help")
        .output()
        .expect("run parlor --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--www",
        "--data",
        "--log-level",
        "--echo",
        "--no-echo",
        "--memory-budget",
        "--max-connections-per-ip",
        "--write-timeout",
        "--trusted-proxy",
        "--database",
        "--node-ttl",
        "--allowed-origin",
        "--max-connections",
        "--max-request-head",
        "--max-headers",
        "--handshake-timeout",
        "--echo-max-message",
        "--max-fragments",
        "--max-queue",
        "--read-budget",
        "--ping-interval",
        "--pong-timeout",
        "--close-timeout",
        "--shutdown-grace",
        "--malloc-trim-threshold",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn bad_flag_values_are_refused() {
    for args in [
        &["--ping-interval", "-1"][..],
        &["--handshake-timeout", "soon"][..],
        &["--max-connections", "many"][..],
        &["--listen", "not-an-address"][..],
        &["--no-such-flag"][..],
        &["--memory-budget", "lots"][..],
        &["--memory-budget", "64TB"][..],
        &["--max-connections-per-ip", "-1"][..],
        &["--write-timeout", "never"][..],
        &["--trusted-proxy", "10.0.0.0/33"][..],
        &["--trusted-proxy", "proxy.example"][..],
        &["--trusted-proxy", "10.0.0.1,nonsense"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_parlor"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run parlor");
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{args:?} started a server"
        );
    }
}

#[test]
fn port_in_use_fails_to_start() {
    let server = Server::echo();
    let data = TempDir::new("data2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .arg("--listen")
        .arg(server.addr.to_string())
        .arg("--data")
        .arg(data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second parlor");
    let ok = eventually(Duration::from_secs(10), || {
        child.try_wait().expect("try_wait").is_some()
    });
    if !ok {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a second server on the same port kept running");
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        out.status.code(),
        Some(4),
        "exit code for the listen address"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot start on"), "says why: {err}");
    assert!(err.contains("in use"), "says why: {err}");
    // The first one is unaffected.
    server.ws().echo("first server fine");
}

/// Starts the binary in `cwd` with only environment variables for settings; returns it and
/// its first two stdout lines.
fn start_in(
    cwd: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (std::process::Child, Vec<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .current_dir(cwd)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn parlor");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        out.read_line(&mut l).expect("read stdout");
        lines.push(l.trim().to_string());
    }
    (child, lines)
}

/// One binary: started from a directory without `www/`, it serves the client built into it,
/// byte for byte the repository's `www/`, and says where to point a browser and where the data
/// is. Every setting here comes from `PARLOR_*` environment variables.
#[test]
fn the_client_is_built_in_and_flags_read_the_environment() {
    let dir = TempDir::new("one-binary");
    let data = dir.path().join("chat-data");
    let (mut child, lines) = start_in(
        dir.path(),
        &[
            ("PARLOR_LISTEN", "127.0.0.1:0"),
            ("PARLOR_DATA", data.to_str().expect("utf8")),
            ("PARLOR_LOG_LEVEL", "warn"),
        ],
        &[],
    );
    let addr: std::net::SocketAddr = lines[0]
        .strip_prefix("parlor listening on ")
        .expect("listening line")
        .parse()
        .expect("address");
    assert_eq!(
        lines[1],
        format!(
            "open http://127.0.0.1:{}/ in a browser; chat data in {}",
            addr.port(),
            std::fs::canonicalize(&data)
                .expect("data dir made")
                .display()
        )
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("www");
    for (path, file) in [("/", "index.html"), ("/js/main.js", "js/main.js")] {
        let mut s = tcp(addr);
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        std::io::Write::write_all(&mut s, req.as_bytes()).expect("request");
        let resp = read_http_to_eof(&mut s);
        assert_eq!(resp.status, 200, "{path}");
        let want = std::fs::read(root.join(file)).expect("www file");
        assert_eq!(resp.body, want, "{path} is the built-in copy of www/{file}");
    }
    let _ = child.kill();
    let _ = child.wait();
    // A bad value from the environment is refused like a bad flag (no listening line)...
    let env = [
        ("PARLOR_LISTEN", "not an address"),
        ("PARLOR_LOG_LEVEL", "warn"),
    ];
    let (mut child, lines) = start_in(dir.path(), &env, &[]);
    assert!(!lines[0].starts_with("parlor listening"), "{lines:?}");
    let _ = child.wait();
    // ...and the environment is only a default: a flag on the command line wins.
    let (mut child, lines) = start_in(dir.path(), &env, &["--listen", "127.0.0.1:0"]);
    assert!(
        lines[0].starts_with("parlor listening on 127.0.0.1:"),
        "{lines:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `--log-format json`: every stderr line of a running server is one JSON object with ts,
/// level, target and msg.
#[test]
fn log_format_json_writes_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("json-logs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .current_dir(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn parlor");
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    // The start logs a line; once the server listens (its signal handlers are in place),
    // SIGTERM logs the shutdown; then stderr ends with the process.
    let first = err.next().expect("a start line").expect("utf8");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut listening = String::new();
    out.read_line(&mut listening).expect("listening line");
    assert!(listening.starts_with("parlor listening on"), "{listening}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut seen = 0;
    for line in std::iter::once(first).chain(err.map_while(Result::ok)) {
        let v: serde_json::Value = serde_json::from_str(&line).expect("each line is JSON");
        assert!(
            matches!(v["level"].as_str(), Some("INFO" | "WARN")),
            "{line}"
        );
        assert!(v["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("parlor")));
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()));
        let ts = v["ts"].as_str().expect("ts");
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
        seen += 1;
    }
    assert!(seen >= 3, "start and shutdown lines: {seen}");
    assert!(child.wait().expect("exit").success());
}

/// A static directory that holds the data directory would serve the database (password
/// hashes included) to anyone: the server refuses to start.
#[test]
fn www_holding_the_data_directory_is_refused() {
    let dir = TempDir::new("www-data");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let out = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .args(["--listen", "127.0.0.1:0", "--www"])
        .arg(dir.path())
        .arg("--data")
        .arg(&data)
        .output()
        .expect("run parlor");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("contains --data"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

/// Runs the binary to its exit with `args` on a free port; returns (exit code, stderr).
fn start_failure(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_parlor"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run parlor");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "{args:?} started a server"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data directory that cannot be used: exit code 3 and the path in the message.
#[test]
fn unusable_data_directory_exits_3() {
    let dir = TempDir::new("bad-data");
    // A regular file where the data directory's parent should be: no user (root included)
    // can create the directory.
    dir.write("not-a-dir", b"x");
    let data = dir.path().join("not-a-dir").join("data");
    let (code, err) = start_failure(&["--data".as_ref(), data.as_os_str()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cannot open the chat store"), "{err}");
    assert!(err.contains("not-a-dir"), "{err}");
    // A data directory holding something that is not a chat database.
    let data = dir.path().join("other");
    std::fs::create_dir_all(&data).expect("dir");
    std::fs::write(data.join("chat.db"), vec![7u8; 4096]).expect("junk db");
    let (code, err) = start_failure(&["--data".as_ref(), data.as_os_str()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("other") && err.contains("not a database"),
        "{err}"
    );
}

/// A certificate or key that cannot be used: exit code 5 and what is wrong with which file.
#[test]
fn bad_certificate_exits_5() {
    let dir = TempDir::new("bad-cert");
    let data = dir.path().join("data");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    dir.write("cert.pem", ck.cert.pem().as_bytes());
    dir.write("key.pem", ck.key_pair.serialize_pem().as_bytes());
    let other = rcgen::KeyPair::generate().expect("key");
    dir.write("other-key.pem", other.serialize_pem().as_bytes());
    dir.write("junk.pem", b"hello");
    let p = |f: &str| dir.path().join(f).into_os_string();
    for (cert, key, says) in [
        ("missing.pem", "key.pem", "missing.pem"),
        ("junk.pem", "key.pem", "no PEM certificate"),
        ("cert.pem", "junk.pem", "no PEM private key"),
        ("cert.pem", "other-key.pem", "refused"),
    ] {
        let (cert, key) = (p(cert), p(key));
        let args = [
            "--data".as_ref(),
            data.as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ];
        let (code, err) = start_failure(&args);
        assert_eq!(code, Some(5), "{err}");
        assert!(err.contains("cannot use the TLS certificate"), "{err}");
        assert!(err.contains(says), "{says}: {err}");
    }
    // One without the other is a usage error (clap's 2).
    let cert = p("cert.pem");
    let (code, err) = start_failure(&["--tls-cert".as_ref(), cert.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-key"), "{err}");
}

/// With --database the chat lives in PostgreSQL: the SQLite-only operator commands refuse
/// instead of quietly working on --data's file, and `migrate` without --database says what
/// it needs.
#[test]
fn sqlite_operator_commands_refuse_a_cluster_database() {
    let dir = std::env::temp_dir().join(format!("parlor-cli-cluster-{}", std::process::id()));
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_parlor"))
            .arg("--data")
            .arg(&dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run parlor")
    };
    for args in [
        &["--database", "postgres://u@127.0.0.1:1/db", "user", "list"][..],
        &[
            "--database",
            "postgres://u@127.0.0.1:1/db",
            "backup",
            "/tmp/x.db",
        ][..],
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("pg_dump"), "{args:?}: {stderr}");
    }
    let out = run(&["migrate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--database"), "{stderr}");
    assert!(
        !dir.join("chat.db").exists(),
        "a refused command created a store"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
