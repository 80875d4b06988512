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
        .arg("--www")
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
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    // The first one is unaffected.
    server.ws().echo("first server fine");
}
