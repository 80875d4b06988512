//! The `parlor` binary: parse flags, set up logging, register endpoints, run the loop.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use parlor::config::{Admin, Config, UserCmd};
use parlor::net::{Endpoint, Server};

/// Exit codes an operator (or systemd's `RestartPreventExitStatus=`) can act on; clap exits
/// with 2 for a bad flag. Listed in docs/DEPLOY.md.
mod exit {
    /// The event loop failed, or an admin command did not complete.
    pub const FAILURE: u8 = 1;
    /// The data directory or the chat store in it cannot be used.
    pub const DATA: u8 = 3;
    /// The listen address cannot be bound (in use, not ours, no permission).
    pub const LISTEN: u8 = 4;
    /// The TLS certificate or key cannot be read or does not fit.
    pub const TLS: u8 = 5;
}

fn main() -> ExitCode {
    let config = Config::parse();
    parlor::logfmt::init(config.log_format, config.log_level).expect("logger set up once");

    if let Some(cmd) = &config.command {
        return run_admin(cmd, &config);
    }

    if let Some(www) = &config.www {
        if serves_data(www, &config.data) {
            log::error!(
                "--www {} contains --data {}: the chat database would be served over HTTP; \
                 keep them apart",
                www.display(),
                config.data.display()
            );
            return ExitCode::from(exit::DATA);
        }
    }
    // Before the store: a typo in a certificate path should not wait for a store to open.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => match parlor::net::tls::load(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("cannot use the TLS certificate: {e}");
                return ExitCode::from(exit::TLS);
            }
        },
        _ => None,
    };
    raise_fd_limit(config.max_connections);
    keep_freed_heap(config.malloc_trim_threshold);

    let mut endpoints = Vec::new();
    if config.echo {
        endpoints.push(Endpoint {
            path: "/echo".into(),
            max_message: config.echo_max_message,
            service: Box::new(parlor::echo::Echo),
        });
    }

    match parlor::chat::ChatService::open(&config.chat, &config.data) {
        Ok(chat) => endpoints.push(Endpoint {
            path: "/ws".into(),
            max_message: config.chat.chat_max_message,
            service: Box::new(chat),
        }),
        Err(e) => {
            match &config.chat.database {
                Some(_) => log::error!("cannot open the chat store in PostgreSQL: {e}"),
                None => log::error!(
                    "cannot open the chat store in {}: {e}",
                    config.data.display()
                ),
            }
            return ExitCode::from(exit::DATA);
        }
    }

    let mut server = match Server::bind(config.clone(), endpoints) {
        Ok(s) => s,
        Err(e) => {
            let addr = match config.metrics_listen {
                Some(m) => format!("{} (or --metrics-listen {m})", config.listen),
                None => config.listen.to_string(),
            };
            log::error!("cannot start on {addr}: {e}");
            return ExitCode::from(exit::LISTEN);
        }
    };
    if let Some(tls) = tls {
        server.set_tls(tls);
    }
    if let Err(e) = server.handle_signals() {
        log::error!("cannot install signal handlers: {e}");
        return ExitCode::from(exit::FAILURE);
    }
    // Tests and scripts read this line to learn the port when started with --listen ...:0.
    println!("parlor listening on {}", server.local_addr());
    println!("{}", where_to_look(&config, server.local_addr()));
    if let Some(addr) = server.metrics_addr() {
        println!("metrics and health on http://{addr}/metrics and /healthz");
    }
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Every connection is a file descriptor, and the usual soft limit (1024) is far below what a
/// chat server holds. Raise it to the hard limit and say so when `--max-connections` cannot fit.
fn raise_fd_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            // Listener, poll, waker, signal pipe, store files, worker threads: keep headroom.
            let needed = max_connections as u64 + 64;
            if limit < needed {
                log::warn!(
                    "file descriptor limit is {limit}, below --max-connections {max_connections} + 64; \
                     raise it (ulimit -n) or connections will fail with EMFILE"
                );
            } else {
                log::debug!("file descriptor limit: {limit}");
            }
        }
        Err(e) => log::warn!("cannot raise the file descriptor limit: {e}"),
    }
}

/// Large frames (a 16 KiB echo, a history page) are allocated and freed once per loop turn. With
/// glibc's default trim threshold the freed heap top goes back to the kernel (`brk`) at the end of
/// a turn and every page is faulted in again on the next: 3.5 page faults per 16 KiB message and
/// 40 % less echo throughput, in runs where glibc's dynamic threshold happened not to rise.
/// Keeping up to `--malloc-trim-threshold` bytes of freed heap makes that steady.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_heap(bytes: usize) {
    if bytes == 0 {
        return;
    }
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a tuning parameter of glibc's allocator; it is called once,
    // before any other thread exists, with a plain integer. Checked by
    // tests/memory_tuning.rs (page faults per large echo stay near zero).
    let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, value) };
    if ok != 1 {
        log::warn!("mallopt(M_TRIM_THRESHOLD, {value}) refused; large frames may cost page faults");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_heap(_bytes: usize) {}

/// The line a person reads at start: a URL to click and where the chat data lives.
fn where_to_look(config: &Config, addr: std::net::SocketAddr) -> String {
    // A wildcard address is not something to put in a browser: show loopback instead.
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let data = std::fs::canonicalize(&config.data).unwrap_or_else(|_| config.data.clone());
    let client = match &config.www {
        Some(dir) => format!(" (client from {})", dir.display()),
        None => String::new(),
    };
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    format!(
        "open {scheme}://{host}:{}/ in a browser{client}; chat data in {}",
        addr.port(),
        data.display()
    )
}

/// `parlor backup FILE` / `parlor restore FILE` / `parlor user …`: one line of result on stdout,
/// or the reason on stderr and exit code 1.
fn run_admin(cmd: &Admin, config: &Config) -> ExitCode {
    use parlor::chat::store;
    let (what, result) = match cmd {
        Admin::User { cmd } => return run_user(cmd, config),
        Admin::Backup { file } => (
            format!("backed up {} to {}", config.data.display(), file.display()),
            store::backup(&config.data, file),
        ),
        Admin::Restore { file } => (
            format!("restored {} into {}", file.display(), config.data.display()),
            store::restore(file, &config.data),
        ),
        Admin::Migrate => {
            let Some(url) = &config.chat.database else {
                eprintln!("parlor: migrate needs --database postgres://… (the target)");
                return ExitCode::from(exit::FAILURE);
            };
            (
                format!("migrated {} into PostgreSQL", config.data.display()),
                store::postgres::migrate_from_sqlite(&config.data, url),
            )
        }
    };
    match result {
        Ok(s) => {
            println!(
                "{what}: {} users, {} rooms, {} messages",
                s.users, s.rooms, s.messages
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("parlor: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// `parlor user …` (see `chat::admin`).
fn run_user(cmd: &UserCmd, config: &Config) -> ExitCode {
    use parlor::chat::admin;
    let dir = &config.data;
    let cost = admin::HashCost {
        memory_kib: config.chat.argon2_memory,
        iterations: config.chat.argon2_iterations,
    };
    let result = match cmd {
        UserCmd::Add { name } => {
            read_password(name).and_then(|pw| Ok(admin::add_user(dir, name, &pw, cost)?))
        }
        UserCmd::Passwd { name } => {
            read_password(name).and_then(|pw| Ok(admin::set_password(dir, name, &pw, cost)?))
        }
        UserCmd::Disable { name } => admin::set_disabled(dir, name, true).map_err(Into::into),
        UserCmd::Enable { name } => admin::set_disabled(dir, name, false).map_err(Into::into),
        UserCmd::List { json } => admin::list_users(dir)
            .map(|list| match json {
                true => admin::list_json(&list),
                false => admin::list_text(&list),
            })
            .map_err(Into::into),
    };
    match result {
        Ok(out) => {
            // `user list` of no accounts prints nothing.
            if !out.is_empty() {
                println!("{}", out.trim_end_matches('\n'));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("parlor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The password for `user add` / `passwd`: asked twice without echo when standard input is a
/// terminal, otherwise the first line of standard input (a script's pipe). Never an argument.
fn read_password(name: &str) -> Result<String, Box<dyn std::error::Error>> {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {name}: "))?;
        let again = rpassword::prompt_password("again: ")?;
        if first != again {
            return Err("the passwords differ".into());
        }
        return Ok(first);
    }
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        return Err("no password on standard input (one line expected)".into());
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    Ok(password.strip_suffix('\r').unwrap_or(password).to_string())
}

/// Whether the static directory `www` holds the data directory (or is it): its files, the
/// database with its password hashes among them, would be served to anyone.
fn serves_data(www: &std::path::Path, data: &std::path::Path) -> bool {
    let (Ok(www), Ok(data)) = (std::fs::canonicalize(www), std::fs::canonicalize(data)) else {
        return false;
    };
    data.starts_with(&www)
}
