//! Checkpoint save and load (with manifest verification) of a BERT-base-sized training state:
//! 110M f32 weights plus the two AdamW moments, about 1.3 GB. The store is `$KDMCSE_BENCH_STORE`
//! (a path or URL; `scripts/bench-checkpoint` points it at a local s3s-fs and at a local folder).

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use kdmcse::checkpoint::CheckpointStore;
use rand::{RngCore, SeedableRng};

fn main() -> anyhow::Result<()> {
    kdmcse::keep_freed_memory();
    let location = std::env::var("KDMCSE_BENCH_STORE").unwrap_or_else(|_| "target/bench-checkpoint".into());
    let params = 110_000_000usize;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut blob = |bytes: usize| {
        let mut data = vec![0u8; bytes];
        rng.fill_bytes(&mut data);
        Bytes::from(data)
    };
    let mut parts = BTreeMap::new();
    parts.insert("model.safetensors".to_owned(), blob(params * 4));
    parts.insert("optimizer.safetensors".to_owned(), blob(params * 8));
    parts.insert("trainer.json".to_owned(), Bytes::from_static(b"{}"));
    let total: usize = parts.values().map(Bytes::len).sum();
    let gb = total as f64 / 1e9;
    let store = CheckpointStore::open(&location)?;
    for round in 0..2u64 {
        let start = Instant::now();
        let name = store.save(round + 1, &parts)?;
        let save = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let loaded = store.load(&name)?;
        let load = start.elapsed().as_secs_f64();
        assert_eq!(loaded.parts.len(), parts.len());
        println!(
            "{location} round {round}: {gb:.2} GB  save {save:.2} s ({:.0} MB/s)  load+verify {load:.2} s ({:.0} MB/s)",
            total as f64 / 1e6 / save,
            total as f64 / 1e6 / load
        );
    }
    store.retain(0)?;
    Ok(())
}
