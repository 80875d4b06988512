//! The queue in front of the password-hashing threads, fair across client addresses.
//!
//! A hash costs tens of milliseconds of a worker's CPU, so whoever fills the workers decides
//! how long everyone else waits. Jobs therefore wait here, on the loop side, in one FIFO per
//! client address, and go to the workers only as fast as they finish (`max_in_flight`, one per
//! worker thread). The next job to run is taken round-robin across addresses: an attacker with
//! a thousand queued guesses delays someone else's login by at most the one hash per worker
//! that is already running. Queues are bounded per address and overall; a job that does not
//! fit is refused at once, before any hashing. Pure data structure: no threads, no clock.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This address already has `per_addr` jobs waiting.
    AddressFull,
    /// `total` jobs are waiting.
    QueueFull,
}

#[derive(Debug)]
pub struct FairQueue<A, J> {
    per_addr: usize,
    total: usize,
    max_in_flight: usize,
    in_flight: usize,
    queued: usize,
    queues: HashMap<A, VecDeque<J>>,
    /// Addresses with waiting jobs, in round-robin order (each at most once).
    turn: VecDeque<A>,
}

impl<A: Hash + Eq + Clone, J> FairQueue<A, J> {
    /// `per_addr` / `total`: most jobs waiting per address / overall (0: no bound).
    /// `max_in_flight`: jobs handed to workers at once (the number of workers).
    pub fn new(per_addr: usize, total: usize, max_in_flight: usize) -> Self {
        FairQueue {
            per_addr,
            total,
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
            queued: 0,
            queues: HashMap::new(),
            turn: VecDeque::new(),
        }
    }

    /// Queues `job` for `addr`, or says why not (nothing is queued then).
    pub fn push(&mut self, addr: A, job: J) -> Result<(), Refused> {
        if self.total != 0 && self.queued >= self.total {
            return Err(Refused::QueueFull);
        }
        let q = self.queues.entry(addr.clone()).or_default();
        if self.per_addr != 0 && q.len() >= self.per_addr {
            return Err(Refused::AddressFull);
        }
        if q.is_empty() {
            self.turn.push_back(addr);
        }
        q.push_back(job);
        self.queued += 1;
        Ok(())
    }

    /// The next job for a worker, if a worker is free: the oldest job of the address whose turn
    /// it is. The caller must call [`FairQueue::done`] when the worker's result comes back.
    pub fn next_job(&mut self) -> Option<J> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        while let Some(addr) = self.turn.pop_front() {
            let Some(q) = self.queues.get_mut(&addr) else {
                continue;
            };
            let Some(job) = q.pop_front() else {
                self.queues.remove(&addr);
                continue;
            };
            if q.is_empty() {
                self.queues.remove(&addr);
            } else {
                self.turn.push_back(addr);
            }
            self.queued -= 1;
            self.in_flight += 1;
            return Some(job);
        }
        None
    }

    /// A job handed out by [`FairQueue::next_job`] finished.
    pub fn done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Drops waiting jobs for which `drop` says so (their connection closed); returns them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&J) -> bool) -> Vec<J> {
        let mut removed = Vec::new();
        for q in self.queues.values_mut() {
            let mut keep = VecDeque::with_capacity(q.len());
            for j in q.drain(..) {
                if drop(&j) {
                    removed.push(j);
                } else {
                    keep.push_back(j);
                }
            }
            *q = keep;
        }
        self.queued -= removed.len();
        self.queues.retain(|_, q| !q.is_empty());
        let queues = &self.queues;
        self.turn.retain(|a| queues.contains_key(a));
        removed
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_across_addresses() {
        let mut q = FairQueue::new(0, 0, 1);
        for i in 0..5 {
            q.push("attacker", i).unwrap();
        }
        q.push("alice", 100).unwrap();
        assert_eq!(q.next_job(), Some(0));
        assert_eq!(q.next_job(), None, "one worker: one in flight");
        q.done();
        assert_eq!(
            q.next_job(),
            Some(100),
            "alice waits for one hash, not five"
        );
        q.done();
        assert_eq!(q.next_job(), Some(1));
        q.done();
        assert_eq!(q.next_job(), Some(2));
    }

    #[test]
    fn bounded_per_address_and_overall() {
        let mut q = FairQueue::new(2, 3, 1);
        q.push("a", 1).unwrap();
        q.push("a", 2).unwrap();
        assert_eq!(q.push("a", 3), Err(Refused::AddressFull));
        q.push("b", 4).unwrap();
        assert_eq!(q.push("c", 5), Err(Refused::QueueFull));
        assert_eq!(q.queued(), 3);
        assert_eq!(q.next_job(), Some(1));
        assert_eq!(q.queued(), 2);
        q.push("c", 5).unwrap();
    }

    #[test]
    fn removed_jobs_leave_no_turn_behind() {
        let mut q = FairQueue::new(0, 0, 2);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        q.push("a", 3).unwrap();
        assert_eq!(q.remove_where(|j| *j != 2), vec![1, 3]);
        assert_eq!(q.queued(), 1);
        assert_eq!(q.next_job(), Some(2));
        assert_eq!(q.next_job(), None);
        assert_eq!(q.in_flight(), 1);
    }
}
