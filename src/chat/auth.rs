//! Password hashing on worker threads (argon2id) and token generation.
//!
//! Hashing costs tens of milliseconds of CPU by design, so it never runs on the event loop:
//! jobs go to worker threads over a channel, results come back over another, followed by a
//! wake of the loop.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};

use super::Wake;

#[derive(Debug)]
pub enum AuthJob {
    /// Hash a new password (register).
    Hash { job: u64, password: String },
    /// Verify a password against a stored PHC string; `None` = unknown user, verified against
    /// a dummy hash so that unknown users take as long as wrong passwords.
    Verify {
        job: u64,
        phc: Option<String>,
        password: String,
    },
}

#[derive(Debug)]
pub enum AuthResult {
    Hashed {
        job: u64,
        phc: Result<String, String>,
    },
    Verified {
        job: u64,
        ok: bool,
    },
}

pub struct AuthPool {
    tx: Option<Sender<AuthJob>>,
    threads: Vec<JoinHandle<()>>,
}

fn hasher(memory_kib: u32, iterations: u32) -> Result<Argon2<'static>, String> {
    let params = Params::new(memory_kib, iterations, 1, None).map_err(|e| e.to_string())?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

fn hash_password(a: &Argon2<'_>, password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    a.hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify(a: &Argon2<'_>, phc: &str, password: &str) -> bool {
    // The stored hash carries its own parameters; verification uses those, so raising the
    // cost later keeps old hashes valid.
    match PasswordHash::new(phc) {
        Ok(h) => a.verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

impl AuthPool {
    /// Starts `threads` workers with argon2id (`memory_kib`, `iterations`, parallelism 1).
    pub fn start(
        threads: usize,
        memory_kib: u32,
        iterations: u32,
        results: Sender<AuthResult>,
        wake: Wake,
    ) -> Result<AuthPool, String> {
        let argon = hasher(memory_kib, iterations)?;
        let (tx, rx) = channel::<AuthJob>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<AuthJob>>> = rx.clone();
            let results = results.clone();
            let wake = wake.clone();
            let argon = argon.clone();
            let h = std::thread::Builder::new()
                .name(format!("chat-auth-{i}"))
                .spawn(move || {
                    // Made once per worker, off the loop: the dummy for unknown users.
                    let dummy =
                        hash_password(&argon, "dummy password for timing").unwrap_or_default();
                    loop {
                        let job = match rx.lock() {
                            Ok(g) => g.recv(),
                            Err(_) => return,
                        };
                        let res = match job {
                            Err(_) => return,
                            Ok(AuthJob::Hash { job, password }) => AuthResult::Hashed {
                                job,
                                phc: hash_password(&argon, &password),
                            },
                            Ok(AuthJob::Verify { job, phc, password }) => {
                                let ok = match phc {
                                    Some(p) => verify(&argon, &p, &password),
                                    None => {
                                        let _ = verify(&argon, &dummy, &password);
                                        false
                                    }
                                };
                                AuthResult::Verified { job, ok }
                            }
                        };
                        if results.send(res).is_err() {
                            return;
                        }
                        wake.wake();
                    }
                })
                .map_err(|e| e.to_string())?;
            handles.push(h);
        }
        Ok(AuthPool {
            tx: Some(tx),
            threads: handles,
        })
    }

    pub fn submit(&self, job: AuthJob) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// Closes the job channel and waits for the workers (each finishes at most one job).
    pub fn stop(&mut self) {
        self.tx = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for AuthPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A new session token: 128 bits from the OS RNG, hex-encoded (32 characters).
pub fn new_token() -> Result<String, String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| e.to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What the store keeps instead of the token. A fast hash is right here: the token already
/// has 128 bits of entropy, so there is nothing to brute-force that slowing down would protect.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let a = hasher(64, 1).unwrap();
        let phc = hash_password(&a, "correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify(&a, &phc, "correct horse"));
        assert!(!verify(&a, &phc, "wrong"));
        assert!(!verify(&a, "garbage", "wrong"));
    }

    #[test]
    fn tokens() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), 32);
        assert_ne!(t, new_token().unwrap());
        assert_eq!(token_hash(&t), token_hash(&t));
    }
}
