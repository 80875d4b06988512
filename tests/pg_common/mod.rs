//! A throwaway PostgreSQL server for tests (`mod pg_common;` in any `tests/*.rs` that is built
//! with `--features pg-tests`): `initdb` into a temporary directory, `postgres` on a free port
//! of 127.0.0.1 with password (SCRAM) authentication, stopped and removed on drop.
//!
//! The server binaries come from the highest `/usr/lib/postgresql/*/bin` (Debian's layout) or
//! `pg_config --bindir`; without them the test panics and names the package to install. As
//! root (CI containers), the data directory belongs to the `postgres` OS user and the server
//! runs as that user (`initdb` refuses root).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The database user `initdb` creates.
pub const USER: &str = "parlor";

pub struct Pg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    /// Run the server binaries as the `postgres` OS user (we are root).
    as_postgres: bool,
    running: bool,
}

/// The directory of `initdb`, `pg_ctl` and `postgres`.
fn bindir() -> PathBuf {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: Vec<u32> = e
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    found.sort();
    let mut candidates: Vec<PathBuf> = found.into_iter().rev().map(|(_, p)| p).collect();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    for c in &candidates {
        if ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| c.join(b).is_file())
        {
            return c.clone();
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under \
         /usr/lib/postgresql/*/bin or `pg_config --bindir` (looked in {candidates:?}); \
         install the Debian package `postgresql` (apt-get install postgresql) to run the \
         pg-tests"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Pg {
    /// Initializes and starts a fresh server; panics (with its log) if it does not come up
    /// within 30 s.
    pub fn start() -> Pg {
        let bin = bindir();
        let dir = std::env::temp_dir().join(format!("parlor-pg-{}", unique()));
        std::fs::create_dir_all(&dir).expect("create the server's temporary directory");
        let password = format!("pw-{}", unique());
        std::fs::write(dir.join("pwfile"), format!("{password}\n")).expect("write pwfile");
        let as_postgres = is_root();
        if as_postgres {
            let st = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .expect("run chown");
            assert!(
                st.success(),
                "chown {} to the postgres user failed",
                dir.display()
            );
        }
        let mut pg = Pg {
            dir,
            bin,
            port: free_port(),
            password,
            as_postgres,
            running: false,
        };
        let data = pg.data();
        let pwfile = pg.dir.join("pwfile");
        let out = pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                USER.as_ref(),
                "--auth=scram-sha-256".as_ref(),
                format!("--pwfile={}", pwfile.display()).as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C.UTF-8".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        if !out.status.success() {
            panic!(
                "initdb failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pg.launch();
        pg
    }

    /// `postgres://parlor:PASSWORD@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_with_password(&self.password)
    }

    pub fn url_with_password(&self, password: &str) -> String {
        format!(
            "postgres://{USER}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A plain client (for checks and for setting up odd states).
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect to test server")
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`), keeping its data.
    pub fn stop(&mut self) {
        self.ctl_stop("fast");
    }

    /// Stops the server abruptly (`pg_ctl stop -m immediate`: no checkpoint, connections
    /// cut), keeping its data, as a crash would.
    pub fn kill(&mut self) {
        self.ctl_stop("immediate");
    }

    /// Starts the stopped server again on the same port and data directory.
    pub fn restart(&mut self) {
        if self.running {
            self.stop();
        }
        self.launch();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, bin: &str, args: &[&std::ffi::OsStr]) -> Output {
        let prog = self.bin.join(bin);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&prog);
            c
        } else {
            Command::new(&prog)
        };
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", prog.display()))
    }

    fn launch(&mut self) {
        let data = self.data();
        let log = self.dir.join("postgres.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let out = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "-o".as_ref(),
                opts.as_ref(),
                "start".as_ref(),
            ],
        );
        if !out.status.success() {
            panic!(
                "postgres did not start:\n{}{}\n--- server log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match postgres::Client::connect(&self.url(), postgres::NoTls) {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "postgres does not accept connections after 30 s: {e:?}\n--- server log ---\n{}",
                    self.log()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn ctl_stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
        if !out.status.success() {
            eprintln!(
                "pg_ctl stop -m {mode}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.running = false;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.ctl_stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
