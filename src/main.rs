//! The `parlor` binary: parse flags, set up logging, register endpoints, run the loop.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use parlor::config::Config;
use parlor::net::{Endpoint, Server};

fn main() -> ExitCode {
    let config = Config::parse();
    simple_logger::SimpleLogger::new()
        .with_level(config.log_level)
        .init()
        .expect("logger set up once");

    raise_fd_limit(config.max_connections);

    let mut endpoints = Vec::new();
    if !config.no_echo {
        endpoints.push(Endpoint {
            path: "/echo".into(),
            max_message: config.echo_max_message,
            service: Box::new(parlor::echo::Echo),
        });
    }

    match parlor::chat::ChatService::open(&config) {
        Ok(chat) => endpoints.push(Endpoint {
            path: "/ws".into(),
            max_message: config.chat.chat_max_message,
            service: Box::new(chat),
        }),
        Err(e) => {
            log::error!(
                "cannot open the chat store in {}: {e}",
                config.data.display()
            );
            return ExitCode::FAILURE;
        }
    }

    let mut server = match Server::bind(config.clone(), endpoints) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot start on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = server.handle_signals() {
        log::error!("cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    // Tests and scripts read this line to learn the port when started with --listen ...:0.
    println!("parlor listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
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
