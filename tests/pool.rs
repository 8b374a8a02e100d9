//! The negative pool is `train.global_batch` whatever the ranks and the micro-batch: real worker
//! processes training KDMCSE (margins, the cosine filter, dropout, text and paired steps) reach the
//! same per-step losses and weights (within 1e-5) with the gradient cache on one rank, on two
//! ranks, and when a two-rank run is resumed by one rank.

mod common;

use std::path::Path;
use std::process::Output;

use common::process::{assert_fails_with, assert_ok, launcher, train};

const STEPS: usize = 5;
const GLOBAL: usize = 32;

fn one_rank(dir: &Path, micro: Option<usize>, extra: &[&str]) -> Output {
    let cfg = common::pool_config(dir, GLOBAL, micro, STEPS);
    train(&cfg, extra)
}

fn two_ranks(dir: &Path, micro: Option<usize>, extra: &[&str]) -> Output {
    let cfg = common::pool_config(dir, GLOBAL, micro, STEPS);
    let mut args = vec!["--nproc", "2", "--standalone", "--", "--config", cfg.to_str().unwrap()];
    args.extend(extra);
    launcher(&args).output().unwrap()
}

/// Losses step by step and final weights of runs `a` and `b` agree within 1e-5.
fn assert_same_training(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (common::step_losses(a), common::step_losses(b));
    assert_eq!(la.len(), STEPS, "{what}: steps of the first run");
    assert_eq!(lb.len(), STEPS, "{what}: steps of the second run");
    for (step, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!((x - y).abs() < 1e-5, "{what}, step {}: loss {x} vs {y}", step + 1);
    }
    let diff = common::max_weight_diff(
        &common::latest_weights(&a.join("out")),
        &common::latest_weights(&b.join("out")),
    );
    assert!(diff < 1e-5, "{what}: weights differ by {diff}");
}

#[test]
fn micro_batches_and_ranks_train_the_model_of_one_big_batch() {
    let whole = tempfile::tempdir().unwrap();
    assert_ok(&one_rank(whole.path(), None, &[]));

    // (a) One rank embedding the pool 8 examples at a time.
    let micro = tempfile::tempdir().unwrap();
    assert_ok(&one_rank(micro.path(), Some(8), &[]));
    assert_same_training(whole.path(), micro.path(), "1 rank, micro 8 vs whole batch");

    // (b) Two ranks of 16 examples, 4 at a time: each computes its 16 rows against the pool of 32.
    let ranks = tempfile::tempdir().unwrap();
    assert_ok(&two_ranks(ranks.path(), Some(4), &[]));
    assert_same_training(whole.path(), ranks.path(), "2 ranks, micro 4 vs 1 rank");
}

#[test]
fn a_two_rank_run_resumed_by_one_rank_continues_the_same_training() {
    let straight = tempfile::tempdir().unwrap();
    assert_ok(&two_ranks(straight.path(), None, &[]));

    let resumed = tempfile::tempdir().unwrap();
    assert_ok(&two_ranks(resumed.path(), None, &["--stop-after", "3"]));
    assert_eq!(common::step_numbers(&resumed.path().join("metrics.jsonl")), [1, 2, 3]);
    let out = one_rank(resumed.path(), None, &[]);
    assert_ok(&out);
    let events = common::process::events(&out.stdout, "resumed");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["step"], 3, "{events:?}");
    assert_same_training(straight.path(), resumed.path(), "2 ranks to step 3, then 1 rank");
}

#[test]
fn pool_settings_that_cannot_work_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::pool_config(dir.path(), GLOBAL, None, STEPS);
    let out = train(&cfg, &["--set", "train.batch_size=8"]);
    assert_fails_with(&out, &["train.global_batch", "train.batch_size", "not both"]);
    let out = train(&cfg, &["--set", "train.micro_batch=0"]);
    assert_fails_with(&out, &["train.micro_batch = 0"]);
    // 32 examples do not split over 3 ranks: every worker says so and the launcher does not
    // restart them (an input error).
    let out = launcher(&["--nproc", "3", "--standalone", "--", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.global_batch = 32 does not divide over 3 ranks"), "{err}");

    // A checkpoint of one pool is not resumed with another unless asked: with the per-process
    // batch_size, the same config on 2 ranks is a pool of 16, not 8.
    let per_process = common::quick_config(dir.path(), dir.path().join("old").to_str().unwrap(), 8, 2);
    assert_ok(&train(&per_process, &[]));
    let out = launcher(&["--nproc", "2", "--standalone", "--", "--config", per_process.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a global batch of 8 (1 ranks), this run has 16 (2 ranks)"), "{err}");
}
