//! The allocator keeps freed heap for reuse (`--malloc-trim-threshold`): large frames are
//! allocated and freed every loop turn, and giving the heap top back to the kernel after each
//! turn costs a page fault per 4 KiB on the next one.

mod common;

use common::*;
use parlor::ws::frame::OpCode;

/// Minor page faults of a process's main thread (the event loop) so far
/// (`/proc/PID/task/PID/stat`, field 10). Other threads are left out: the password workers fault
/// in their argon2 buffers at start, concurrently with the measurement.
fn loop_minor_faults(pid: u32) -> u64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).expect("read /proc stat");
    // The command name may hold spaces; the fields after it are plain.
    let after_name = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
    after_name
        .split_whitespace()
        .nth(7)
        .expect("minflt field")
        .parse()
        .expect("minflt is a number")
}

const MESSAGE: usize = 16 * 1024;
const BURST: usize = 16;
const ROUNDS: usize = 40;

/// Page faults the server takes per echoed 16 KiB message, in steady state: each round every
/// client writes a burst of messages in one go (so the server queues many large frames in one
/// turn and frees them after the flush), then reads all the echoes.
fn faults_per_message(args: &[&str]) -> f64 {
    let server = Server::echo_with(args);
    let payload = pattern(MESSAGE, 3);
    let burst: Vec<u8> = (0..BURST)
        .flat_map(|_| masked(true, OpCode::Binary, &payload))
        .collect();
    let mut clients: Vec<WsClient> = (0..4).map(|_| server.ws_at("/echo")).collect();
    let round = |clients: &mut Vec<WsClient>| {
        for c in clients.iter_mut() {
            c.send_raw(&burst);
        }
        for c in clients.iter_mut() {
            for _ in 0..BURST {
                c.expect_binary(&payload);
            }
        }
    };
    // Warm-up: the heap grows to its working size once.
    for _ in 0..5 {
        round(&mut clients);
    }
    let before = loop_minor_faults(server.pid());
    for _ in 0..ROUNDS {
        round(&mut clients);
    }
    let faults = loop_minor_faults(server.pid()) - before;
    eprintln!("{args:?}: {faults} page faults in the loop thread");
    faults as f64 / (ROUNDS * BURST * clients.len()) as f64
}

#[test]
fn large_echo_bursts_do_not_fault_the_heap_back_in() {
    let per_message = faults_per_message(&[]);
    assert!(
        per_message < 0.1,
        "{per_message:.2} page faults per 16 KiB echo with the default --malloc-trim-threshold"
    );
}

/// The other side of the same coin, so the test above cannot pass by accident: glibc's own
/// 128 KiB threshold, pinned, makes every burst fault its pages back in.
#[test]
fn a_small_trim_threshold_faults_pages_per_message() {
    let per_message = faults_per_message(&["--malloc-trim-threshold", "131072"]);
    assert!(
        per_message > 1.0,
        "only {per_message:.2} page faults per 16 KiB echo with a 128 KiB trim threshold"
    );
}
