//! Epoch permutations, global batches and the data cursor.
//!
//! Each epoch's order is a permutation drawn from (seed, stream, epoch). Global batch `s` is the
//! next `world_size * batch_size` examples of that order, whatever the number of ranks; rank `r`
//! takes the contiguous slice `[r * batch_size, (r + 1) * batch_size)`. An epoch's incomplete last
//! batch is dropped, so every rank takes the same number of steps and every example is seen at
//! most once per epoch, by exactly one rank.
//!
//! The cursor counts examples of the global order, so it is the same on every rank. Resuming with
//! another world size continues from the same example (the rule for re-sharding): the global batch
//! becomes `new_world * batch_size` examples from there on.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where a stream stands: the epoch and the number of examples of its order already taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub offset: usize,
}

/// Where the data streams stand; saved with every checkpoint (inside the trainer state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPosition {
    /// Micro-batches taken (`step * grad_accum`); decides text vs paired batches and dropout.
    pub micro_step: u64,
    pub text_cursor: Cursor,
    pub paired_cursor: Cursor,
}

/// An endless, epoch-shuffled stream over `len` examples.
pub struct Sampler {
    len: usize,
    seed: u64,
    stream: u64,
    order: Option<(u64, Vec<u32>)>,
}

impl Sampler {
    /// `stream` tells apart the corpora drawn from one seed (text 0, paired 1).
    pub fn new(len: usize, seed: u64, stream: u64) -> Self {
        Self { len, seed, stream, order: None }
    }

    /// Global batches in one epoch.
    pub fn batches_per_epoch(&self, global_batch: usize) -> usize {
        self.len / global_batch
    }

    /// The permutation of `epoch`.
    pub fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len as u32).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ (self.stream << 56) ^ epoch.wrapping_mul(0x9E37_79B9));
        order.shuffle(&mut rng);
        order
    }

    /// The next global batch (example indices, in order), advancing `cursor`.
    pub fn next_batch(&mut self, cursor: &mut Cursor, global_batch: usize) -> Vec<u32> {
        assert!(global_batch <= self.len, "global batch {global_batch} exceeds the corpus ({})", self.len);
        if cursor.offset + global_batch > self.len {
            cursor.epoch += 1;
            cursor.offset = 0;
        }
        if self.order.as_ref().is_none_or(|(epoch, _)| *epoch != cursor.epoch) {
            self.order = Some((cursor.epoch, self.permutation(cursor.epoch)));
        }
        let order = &self.order.as_ref().expect("order set above").1;
        let batch = order[cursor.offset..cursor.offset + global_batch].to_vec();
        cursor.offset += global_batch;
        batch
    }
}

/// Rank `rank`'s contiguous slice of a global batch.
pub fn rank_slice(global: &[u32], rank: usize, world_size: usize) -> &[u32] {
    let per_rank = global.len() / world_size;
    &global[rank * per_rank..(rank + 1) * per_rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_covers_each_example_once_across_ranks() {
        let mut sampler = Sampler::new(103, 7, 0);
        let mut cursor = Cursor::default();
        let mut seen = vec![0; 103];
        for _ in 0..sampler.batches_per_epoch(2 * 8) {
            let global = sampler.next_batch(&mut cursor, 16);
            for rank in 0..2 {
                for &i in rank_slice(&global, rank, 2) {
                    seen[i as usize] += 1;
                }
            }
        }
        assert_eq!(seen.iter().filter(|&&n| n == 1).count(), 96);
        assert!(seen.iter().all(|&n| n <= 1));
        // The next batch starts epoch 1 in a different order.
        let next = sampler.next_batch(&mut cursor, 16);
        assert_eq!(cursor, Cursor { epoch: 1, offset: 16 });
        assert_ne!(next, sampler.permutation(0)[..16].to_vec());
    }

    #[test]
    fn a_restored_cursor_continues_exactly() {
        let mut a = Sampler::new(50, 1, 1);
        let mut cursor = Cursor::default();
        let straight: Vec<Vec<u32>> = (0..12).map(|_| a.next_batch(&mut cursor, 8)).collect();
        let mut cursor = Cursor::default();
        let mut b = Sampler::new(50, 1, 1);
        let first: Vec<Vec<u32>> = (0..5).map(|_| b.next_batch(&mut cursor, 8)).collect();
        let saved = serde_json::to_string(&cursor).unwrap();
        let mut restored: Cursor = serde_json::from_str(&saved).unwrap();
        let mut c = Sampler::new(50, 1, 1);
        let rest: Vec<Vec<u32>> = (0..7).map(|_| c.next_batch(&mut restored, 8)).collect();
        assert_eq!([first, rest].concat(), straight);
    }
}
