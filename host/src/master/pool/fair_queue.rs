//! A pool's queue of job keys, shared fairly between the client connections that fill it: a
//! lane (FIFO) per client and a ring of the lanes that hold jobs, served one job per lane per
//! turn, so a client with a million jobs queued delays another's single job by one turn, not
//! by a million jobs. Jobs given back (a lost job's retry, jobs taken back from a worker) go
//! before every lane: they waited longest. Every operation a submit or a dispatch makes is
//! O(1) amortised; dropping a client's lane is O(its jobs).
//!
//! Pure bookkeeping of keys: it never looks at a job, decides what is dropped, or answers one.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::master::supervisor::ClientId;

#[derive(Debug, Default)]
pub struct FairQueue {
    /// Given back to the queue: dispatched before any lane, in this order.
    front: VecDeque<u64>,
    /// Each client's jobs in the order it sent them. A lane emptied by [`FairQueue::retain_lane`]
    /// stays (empty) while the ring still names it, so the ring never names a lane twice.
    lanes: FxHashMap<ClientId, VecDeque<u64>>,
    /// The lanes in the order they are served; each lane with jobs is in it exactly once (and
    /// emptied lanes until their turn comes or the ring is compacted).
    ring: VecDeque<ClientId>,
    /// Lanes in the ring that hold no job.
    empty_in_ring: usize,
    len: usize,
}

impl FairQueue {
    /// Jobs queued, in the lanes and given back.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Jobs queued in `client`'s lane.
    pub fn lane_len(&self, client: ClientId) -> usize {
        self.lanes.get(&client).map_or(0, VecDeque::len)
    }

    /// Clients with jobs in their lane.
    pub fn lanes(&self) -> usize {
        self.ring.len() - self.empty_in_ring
    }

    /// A newly accepted job of `client`: at the end of its lane.
    pub fn push_back(&mut self, client: ClientId, key: u64) {
        // Every lane in `lanes` is in the ring exactly once; an empty one was emptied by
        // `retain_lane` and keeps its place.
        match self.lanes.entry(client) {
            Entry::Occupied(lane) => {
                let lane = lane.into_mut();
                if lane.is_empty() {
                    self.empty_in_ring -= 1;
                }
                lane.push_back(key);
            }
            Entry::Vacant(lane) => {
                lane.insert(VecDeque::from([key]));
                self.ring.push_back(client);
            }
        }
        self.len += 1;
    }

    /// A job given back: dispatched before everything queued.
    pub fn push_front(&mut self, key: u64) {
        self.front.push_front(key);
        self.len += 1;
    }

    /// The next job to dispatch: a given-back one, else the head of the next lane's turn.
    pub fn pop_front(&mut self) -> Option<u64> {
        if let Some(key) = self.front.pop_front() {
            self.len -= 1;
            return Some(key);
        }
        while let Some(client) = self.ring.pop_front() {
            let Some(lane) = self.lanes.get_mut(&client) else {
                continue;
            };
            let Some(key) = lane.pop_front() else {
                // Emptied by `retain_lane`: its turn is over for good.
                self.empty_in_ring -= 1;
                self.lanes.remove(&client);
                continue;
            };
            if lane.is_empty() {
                // Freed, not kept: a lane that held a flood keeps no memory after it.
                self.lanes.remove(&client);
            } else {
                self.ring.push_back(client);
            }
            self.len -= 1;
            return Some(key);
        }
        None
    }

    /// Keeps only the jobs of `client`'s lane that `keep` says; `keep` sees each once, in
    /// order (and may act on the ones it drops). O(the lane's jobs).
    pub fn retain_lane(&mut self, client: ClientId, mut keep: impl FnMut(u64) -> bool) {
        let Some(lane) = self.lanes.get_mut(&client) else {
            return;
        };
        let before = lane.len();
        lane.retain(|&key| keep(key));
        self.len -= before - lane.len();
        if before > 0 && lane.is_empty() {
            self.empty_in_ring += 1;
            // Compact when most of the ring is empty lanes (a pool nobody dispatches from, whose
            // clients come and go): amortised O(1) per emptied lane, and bounded memory.
            if self.empty_in_ring > self.ring.len() / 2 {
                let lanes = &mut self.lanes;
                self.ring.retain(|c| match lanes.get(c) {
                    Some(lane) if !lane.is_empty() => true,
                    _ => {
                        lanes.remove(c);
                        false
                    }
                });
                self.empty_in_ring = 0;
            }
        }
    }

    /// Keeps only the given-back jobs that `keep` says (they are few: at most what the
    /// workers held).
    pub fn retain_front(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let before = self.front.len();
        self.front.retain(|&key| keep(key));
        self.len -= before - self.front.len();
    }

    /// Forgets every job.
    pub fn clear(&mut self) {
        *self = FairQueue::default();
    }

    /// Every job queued: the given-back ones, then each lane in the ring's order (for one
    /// client, the order they are dispatched in). For the supervisor's tests.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.front.iter().copied().chain(
            self.ring
                .iter()
                .filter_map(|c| self.lanes.get(c))
                .flat_map(|lane| lane.iter().copied()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientId = ClientId(1);
    const B: ClientId = ClientId(2);
    const C: ClientId = ClientId(3);

    fn drain(q: &mut FairQueue) -> Vec<u64> {
        std::iter::from_fn(|| q.pop_front()).collect()
    }

    #[test]
    fn one_client_is_served_in_its_order() {
        let mut q = FairQueue::default();
        for key in 1..=5 {
            q.push_back(A, key);
        }
        assert_eq!(q.len(), 5);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(drain(&mut q), vec![1, 2, 3, 4, 5]);
        assert!(q.is_empty());
        assert!(q.lanes.is_empty(), "an emptied lane is freed");
    }

    #[test]
    fn a_flood_delays_another_clients_job_by_one_turn() {
        let mut q = FairQueue::default();
        for key in 1..=1000 {
            q.push_back(A, key);
        }
        q.push_back(B, 5000);
        assert_eq!(q.lanes(), 2);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(
            q.pop_front(),
            Some(5000),
            "B's turn comes right after A's first"
        );
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.lanes(), 1);
    }

    #[test]
    fn lanes_take_turns_one_job_each() {
        let mut q = FairQueue::default();
        for key in [1, 2, 3] {
            q.push_back(A, key);
        }
        for key in [11, 12] {
            q.push_back(B, key);
        }
        q.push_back(C, 21);
        assert_eq!(drain(&mut q), vec![1, 11, 21, 2, 12, 3]);
    }

    #[test]
    fn given_back_jobs_go_before_every_lane_in_their_order() {
        let mut q = FairQueue::default();
        q.push_back(A, 1);
        q.push_back(B, 2);
        // As the supervisor gives back what a worker held: last first.
        q.push_front(8);
        q.push_front(7);
        assert_eq!(q.len(), 4);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![7, 8, 1, 2]);
        assert_eq!(drain(&mut q), vec![7, 8, 1, 2]);
    }

    #[test]
    fn a_dropped_lane_loses_its_turn_and_its_jobs() {
        let mut q = FairQueue::default();
        for key in 1..=4 {
            q.push_back(A, key);
        }
        q.push_back(B, 10);
        q.push_back(B, 11);
        let mut dropped = Vec::new();
        q.retain_lane(A, |key| {
            dropped.push(key);
            false
        });
        assert_eq!(dropped, vec![1, 2, 3, 4]);
        assert_eq!((q.len(), q.lanes(), q.lane_len(A)), (2, 1, 0));
        assert_eq!(drain(&mut q), vec![10, 11]);
        assert!(q.lanes.is_empty() && q.ring.is_empty() && q.empty_in_ring == 0);
    }

    #[test]
    fn a_lane_kept_in_part_keeps_its_place() {
        let mut q = FairQueue::default();
        for key in 1..=4 {
            q.push_back(A, key);
        }
        q.push_back(B, 10);
        q.retain_lane(A, |key| key % 2 == 0);
        assert_eq!(q.len(), 3);
        assert_eq!(drain(&mut q), vec![2, 10, 4]);
    }

    #[test]
    fn an_emptied_lane_that_fills_again_is_in_the_ring_once() {
        let mut q = FairQueue::default();
        q.push_back(A, 1);
        q.push_back(B, 2);
        q.push_back(C, 3);
        q.retain_lane(A, |_| false);
        q.push_back(A, 4);
        q.push_back(A, 5);
        assert_eq!(q.lanes(), 3);
        assert_eq!(drain(&mut q), vec![4, 2, 3, 5]);
    }

    #[test]
    fn emptied_lanes_of_a_pool_nobody_serves_do_not_pile_up() {
        let mut q = FairQueue::default();
        q.push_back(ClientId(0), 0);
        for c in 1..10_000u64 {
            q.push_back(ClientId(c), c);
            q.retain_lane(ClientId(c), |_| false);
        }
        assert!(q.ring.len() <= 3, "{} lanes in the ring", q.ring.len());
        assert!(q.lanes.len() <= 3);
        assert_eq!((q.len(), q.lanes()), (1, 1));
        assert_eq!(drain(&mut q), vec![0]);
    }

    #[test]
    fn given_back_jobs_can_be_dropped_too() {
        let mut q = FairQueue::default();
        q.push_front(3);
        q.push_front(2);
        q.push_back(A, 9);
        q.retain_front(|key| key != 2);
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), vec![3, 9]);
        q.push_back(A, 1);
        q.clear();
        assert!(q.is_empty() && q.pop_front().is_none());
    }
}
