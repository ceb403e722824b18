//! The seam between the agent and the kernel: [`Datapath`] is everything the run loop
//! asks of the maps (write a group of operations, read them all back, say how much they
//! hold). lb-user's `BpfMaps` is the real one, over the pinned BPF maps; [`MemoryMaps`]
//! is an in-memory one whose faults a test chooses, so the loop's error paths run
//! without root or a kernel.

use std::collections::VecDeque;

use crate::{
    ops::{Op, Snapshot},
    plan::Capacity,
};

/// What the agent needs of the maps it programs.
pub trait Datapath {
    type Error: std::fmt::Display;

    /// Writes one group of operations, in order (the kernel may batch them).
    fn apply(&mut self, ops: &[Op]) -> Result<(), Self::Error>;

    /// Everything the maps hold now.
    fn snapshot(&mut self) -> Result<Snapshot, Self::Error>;

    /// How much the maps hold (their max_entries).
    fn capacity(&self) -> Result<Capacity, Self::Error>;
}

/// A fault for [`MemoryMaps`] to show, once, in the order queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `apply` writes its first `after` operations, then fails (a batch the
    /// kernel refused part way: what the maps hold is then uncertain to the agent).
    Apply { after: usize },
    /// The next `snapshot` fails.
    Snapshot,
}

/// Maps in memory, with faults on demand.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    /// What the maps hold.
    pub maps: Snapshot,
    pub capacity: Capacity,
    faults: VecDeque<Fault>,
    /// Calls so far, failed ones included.
    pub applies: usize,
    pub snapshots: usize,
    /// Operations written so far.
    pub ops_written: usize,
}

impl MemoryMaps {
    /// Queues `fault` behind any already queued.
    pub fn inject(&mut self, fault: Fault) {
        self.faults.push_back(fault);
    }

    /// Faults queued and not shown yet.
    pub fn pending_faults(&self) -> usize {
        self.faults.len()
    }
}

impl Datapath for MemoryMaps {
    type Error = String;

    fn apply(&mut self, ops: &[Op]) -> Result<(), String> {
        self.applies += 1;
        let limit = match self.faults.front() {
            Some(Fault::Apply { after }) => Some(*after),
            _ => None,
        };
        for op in ops.iter().take(limit.unwrap_or(usize::MAX)) {
            self.maps.apply(op);
            self.ops_written += 1;
        }
        match limit {
            Some(after) if after < ops.len() => {
                self.faults.pop_front();
                Err(format!(
                    "injected fault: {} after {after} of {} operations",
                    ops[after],
                    ops.len()
                ))
            }
            _ => Ok(()),
        }
    }

    fn snapshot(&mut self) -> Result<Snapshot, String> {
        self.snapshots += 1;
        if self.faults.front() == Some(&Fault::Snapshot) {
            self.faults.pop_front();
            return Err("injected fault: reading the maps".into());
        }
        Ok(self.maps.clone())
    }

    fn capacity(&self) -> Result<Capacity, String> {
        Ok(self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Op;

    #[test]
    fn faults_come_once_in_order() {
        let mut m = MemoryMaps::default();
        let ops: Vec<Op> = (1..=3).map(|id| Op::DelBackend { id }).collect();
        m.inject(Fault::Apply { after: 1 });
        m.inject(Fault::Snapshot);
        let err = m.apply(&ops).unwrap_err();
        assert!(err.contains("after 1 of 3"), "{err}");
        assert_eq!(m.ops_written, 1);
        assert!(m.snapshot().is_err());
        assert!(m.apply(&ops).is_ok() && m.snapshot().is_ok());
        assert_eq!(
            (m.applies, m.snapshots, m.ops_written, m.pending_faults()),
            (2, 2, 4, 0)
        );
    }
}
