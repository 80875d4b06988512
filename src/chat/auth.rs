//! Password hashing on worker threads (argon2id) and token generation.
//!
//! Hashing costs tens of milliseconds of CPU by design, so it never runs on the event loop:
//! jobs go to worker threads over a channel, results come back over another, followed by a
//! wake of the loop.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use argon2::password_hash::{Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;

use super::core::{AuthJob, AuthResult};
use super::Wake;

pub struct AuthPool {
    tx: Option<Sender<AuthJob>>,
    threads: Vec<JoinHandle<()>>,
}

fn hasher(memory_kib: u32, iterations: u32) -> Result<Argon2<'static>, String> {
    let params = Params::new(memory_kib, iterations, 1, None).map_err(|e| e.to_string())?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Largest argon2 memory a stored hash may ask for (1 GiB); a corrupt or hostile row cannot make
/// a worker allocate more.
const MAX_BLOCKS: usize = 1 << 20;

/// One worker's hashing state. Argon2 needs `m` KiB of scratch per call (19 MiB with OWASP
/// settings); allocating it per call left glibc holding ~10 MiB per login in the worker's
/// arena (20 registrations grew the server from 25 MB to 220 MB). The worker allocates the
/// blocks once and reuses them for every hash and verification.
struct Hasher {
    argon: Argon2<'static>,
    blocks: Vec<Block>,
}

impl Hasher {
    fn new(argon: Argon2<'static>) -> Hasher {
        let blocks = vec![Block::default(); argon.params().block_count()];
        Hasher { argon, blocks }
    }

    /// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) for a new password.
    fn hash(&mut self, password: &str) -> Result<String, String> {
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|e| e.to_string())?;
        let mut out = [0u8; 32];
        let blocks = self.argon.params().block_count();
        self.argon
            .hash_password_into_with_memory(
                password.as_bytes(),
                &salt,
                &mut out,
                &mut self.blocks[..blocks],
            )
            .map_err(|e| e.to_string())?;
        let p = self.argon.params();
        Ok(format!(
            "$argon2id$v=19$m={},t={},p={}${}${}",
            p.m_cost(),
            p.t_cost(),
            p.p_cost(),
            STANDARD_NO_PAD.encode(salt),
            STANDARD_NO_PAD.encode(out)
        ))
    }

    /// Checks `password` against a stored PHC string, using the parameters stored with it so
    /// that raising the cost later keeps old hashes valid. The comparison is constant-time.
    fn verify(&mut self, phc: &str, password: &str) -> bool {
        self.try_verify(phc, password).unwrap_or(false)
    }

    fn try_verify(&mut self, phc: &str, password: &str) -> Option<bool> {
        let h = PasswordHash::new(phc).ok()?;
        let algorithm = Algorithm::try_from(h.algorithm).ok()?;
        let version = Version::try_from(h.version.unwrap_or(0x13)).ok()?;
        let params = Params::try_from(&h).ok()?;
        let expected = h.hash?;
        let mut salt_buf = [0u8; 64];
        let salt = h.salt?.decode_b64(&mut salt_buf).ok()?;
        let blocks = params.block_count();
        if blocks > MAX_BLOCKS {
            return None;
        }
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, Block::default());
        }
        let mut out = vec![0u8; expected.len()];
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                &mut self.blocks[..blocks],
            )
            .ok()?;
        Some(Output::new(&out).ok()? == expected)
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
                    let mut hasher = Hasher::new(argon);
                    // Made once per worker, off the loop: the dummy for unknown users.
                    let dummy = hasher.hash("dummy password for timing").unwrap_or_default();
                    loop {
                        let job = match rx.lock() {
                            Ok(g) => g.recv(),
                            Err(_) => return,
                        };
                        let res = match job {
                            Err(_) => return,
                            Ok(AuthJob::Hash { job, password }) => AuthResult::Hashed {
                                job,
                                phc: hasher.hash(&password),
                                token: new_token().ok(),
                            },
                            Ok(AuthJob::Verify { job, phc, password }) => {
                                let ok = match phc {
                                    Some(p) => hasher.verify(&p, &password),
                                    None => {
                                        let _ = hasher.verify(&dummy, &password);
                                        false
                                    }
                                };
                                let token = if ok { new_token().ok() } else { None };
                                AuthResult::Verified { job, ok, token }
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

/// A PHC string for `password`, made exactly as the hashing workers make it (argon2id with
/// `memory_kib` and `iterations`, parallelism 1), for `parlor user add` / `passwd`, which hash
/// in their own process.
pub fn hash_password(password: &str, memory_kib: u32, iterations: u32) -> Result<String, String> {
    Hasher::new(hasher(memory_kib, iterations)?).hash(password)
}

/// A new session token: 128 bits from the OS RNG, hex-encoded (32 characters).
pub fn new_token() -> Result<String, String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| e.to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub use super::core::cmd::auth::token_hash;

#[cfg(test)]
mod tests {
    use super::*;

    use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};

    #[test]
    fn hash_and_verify() {
        let mut h = Hasher::new(hasher(64, 1).unwrap());
        let phc = h.hash("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert!(h.verify(&phc, "correct horse"));
        assert!(!h.verify(&phc, "wrong"));
        assert!(!h.verify("garbage", "wrong"));
        assert_ne!(phc, h.hash("correct horse").unwrap(), "salt must differ");
    }

    /// Our PHC strings and the argon2 crate's are interchangeable: accounts created before the
    /// worker kept its memory still log in, and our hashes verify with the reference code.
    #[test]
    fn compatible_with_the_argon2_crate_both_ways() {
        let argon = hasher(128, 2).unwrap();
        let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
        let theirs = argon
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        let mut h = Hasher::new(argon.clone());
        assert!(h.verify(&theirs, "correct horse"));
        assert!(!h.verify(&theirs, "correct horsf"));
        let ours = h.hash("battery staple").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(argon.verify_password(b"battery staple", &parsed).is_ok());
        assert!(argon.verify_password(b"battery stapler", &parsed).is_err());
    }

    /// A hash stored with other (higher) parameters still verifies: the worker grows its memory.
    #[test]
    fn verifies_hashes_made_with_other_parameters() {
        let old = hasher(256, 1).unwrap();
        let salt = SaltString::encode_b64(&[9u8; 16]).unwrap();
        let phc = old.hash_password(b"pw123456", &salt).unwrap().to_string();
        let mut h = Hasher::new(hasher(64, 1).unwrap());
        assert!(h.verify(&phc, "pw123456"));
        assert!(!h.verify(&phc, "pw1234567"));
    }

    /// What `parlor user add` stores verifies like what `register` stores.
    #[test]
    fn hash_password_matches_the_workers() {
        let phc = hash_password("correct horse", 64, 1).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        let mut h = Hasher::new(hasher(19456, 2).unwrap());
        assert!(h.verify(&phc, "correct horse"));
        assert!(!h.verify(&phc, "correct horsf"));
        assert!(
            hash_password("x", 1, 1).is_err(),
            "argon2 refuses m < 8p KiB"
        );
    }

    #[test]
    fn tokens() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), 32);
        assert_ne!(t, new_token().unwrap());
        assert_eq!(token_hash(&t), token_hash(&t));
    }
}
