//! Which examples each optimiser step trains on, as a pure function of the step number.
//!
//! This mirrors the reference loop: a shuffling `DataLoader` (`drop_last=False`, so the epoch's
//! last batch may be smaller) inside `accelerator.accumulate`, which steps the optimiser after
//! every `gradient_accumulation_steps` micro-batches *and* at the end of each epoch, so an
//! epoch's last optimiser step may see fewer micro-batches (accelerate still divides the loss by
//! the full accumulation count). Epochs are reshuffled from their own seeded stream. Because
//! the plan for step `k` depends only on `k`, a resumed run picks up its data position from the
//! step number alone.

use crate::rng::{Purpose, Seeds};

/// The shape of the data schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub examples: usize,
    pub batch_size: usize,
    pub accumulation: usize,
    pub seeds: Seeds,
}

/// One micro-batch: its number counted over the whole run (which picks its random stream) and
/// the indices of its examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    pub index: u64,
    pub examples: Vec<usize>,
}

/// What one optimiser step consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub epoch: u64,
    pub micro_batches: Vec<MicroBatch>,
}

impl Plan {
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.examples.div_ceil(self.batch_size)
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch().div_ceil(self.accumulation)
    }

    /// The order of the examples in `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        self.seeds.stream(Purpose::Shuffle, epoch).permutation(self.examples)
    }

    /// The micro-batches of optimiser step `step` (counted from 0).
    pub fn step(&self, step: u64) -> StepPlan {
        let per_epoch = self.steps_per_epoch() as u64;
        let epoch = step / per_epoch;
        let within = (step % per_epoch) as usize;
        let order = self.epoch_order(epoch);
        let batches: Vec<&[usize]> = order.chunks(self.batch_size).collect();
        let first = within * self.accumulation;
        let last = (first + self.accumulation).min(batches.len());
        let base = epoch * self.micro_batches_per_epoch() as u64;
        let micro_batches = (first..last)
            .map(|b| MicroBatch { index: base + b as u64, examples: batches[b].to_vec() })
            .collect();
        StepPlan { epoch, micro_batches }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(examples: usize, batch_size: usize, accumulation: usize) -> Plan {
        Plan { examples, batch_size, accumulation, seeds: Seeds::new(0) }
    }

    #[test]
    fn an_epoch_covers_every_example_once() {
        let p = plan(10, 3, 2);
        assert_eq!(p.micro_batches_per_epoch(), 4);
        assert_eq!(p.steps_per_epoch(), 2);
        let mut seen: Vec<usize> =
            (0..2).flat_map(|s| p.step(s).micro_batches).flat_map(|m| m.examples).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn the_last_batch_of_an_epoch_may_be_smaller() {
        let p = plan(10, 3, 2);
        let sizes: Vec<usize> = p.step(1).micro_batches.iter().map(|m| m.examples.len()).collect();
        assert_eq!(sizes, vec![3, 1]);
    }

    #[test]
    fn the_last_step_of_an_epoch_may_accumulate_fewer_micro_batches() {
        let p = plan(5, 1, 4);
        assert_eq!(p.steps_per_epoch(), 2);
        assert_eq!(p.step(0).micro_batches.len(), 4);
        assert_eq!(p.step(1).micro_batches.len(), 1);
        assert_eq!(p.step(2).micro_batches.len(), 4, "a new epoch starts a full group");
    }

    #[test]
    fn micro_batches_are_numbered_consecutively_across_epochs() {
        let p = plan(5, 1, 4);
        let numbers: Vec<u64> =
            (0..4).flat_map(|s| p.step(s).micro_batches).map(|m| m.index).collect();
        assert_eq!(numbers, (0..10).collect::<Vec<_>>());
        assert_eq!(p.step(2).epoch, 1);
    }

    #[test]
    fn each_epoch_is_shuffled_differently_and_reproducibly() {
        let p = plan(20, 20, 1);
        assert_ne!(p.epoch_order(0), p.epoch_order(1));
        assert_eq!(p.step(1).micro_batches, plan(20, 20, 1).step(1).micro_batches);
    }
}
