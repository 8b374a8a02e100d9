//! The encoder against ../shared/golden/bert_minilm.*: token ids equal, CLS and mean vectors
//! within 1e-4 of PyTorch for every sentence, truncated to 32 tokens and not truncated.

mod common;

use candle_core::{DType, Device, Tensor};
use kdmcse::data::Tokenizer;
use kdmcse::model::{self, dropout::Dropout, Pooling};

#[test]
fn minilm_matches_pytorch() {
    let golden = common::golden("bert_minilm.safetensors");
    let meta = common::golden_json("bert_minilm.json");
    let sentences: Vec<&str> =
        meta["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let dir = common::minilm_dir();
    let device = Device::Cpu;
    let encoder = model::load_encoder(&dir, &device).unwrap();
    for (setting, max_len) in [("trunc32", 32), ("full", encoder.config.max_tokens())] {
        let tokenizer = Tokenizer::from_dir(&dir, max_len, 0).unwrap();
        let batch = tokenizer.batch(&sentences, &device).unwrap();
        for (name, ours) in [
            ("input_ids", &batch.input_ids),
            ("attention_mask", &batch.attention_mask),
            ("token_type_ids", &batch.token_type_ids),
        ] {
            let expected =
                golden[&format!("{setting}/{name}")].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
            let ours = ours.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
            assert_eq!(ours, expected, "{setting}/{name}");
        }
        let hidden = encoder.forward(&batch, &Dropout::disabled()).unwrap();
        for (name, pooling) in [("cls", Pooling::Cls), ("mean", Pooling::Avg)] {
            let ours = pooling.pool(&hidden, &batch.attention_mask).unwrap();
            let expected: &Tensor = &golden[&format!("{setting}/{name}")];
            let diff = common::max_abs_diff(&ours, expected);
            assert!(diff < 1e-4, "{setting}/{name}: max abs diff {diff}");
            let embedded = encoder.embed(&batch, &Dropout::disabled(), pooling).unwrap();
            let diff = common::max_abs_diff(&embedded, expected);
            assert!(diff < 1e-4, "{setting}/{name} via embed: max abs diff {diff}");
        }
    }
}

#[test]
fn evaluation_mode_is_deterministic_and_train_mode_is_not() {
    let dir = common::minilm_dir();
    let device = Device::Cpu;
    let encoder = model::load_encoder(&dir, &device).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir, 32, 0).unwrap();
    let batch = tokenizer.batch(&["a man plays a guitar .", "two dogs run"], &device).unwrap();
    let run = |dropout: &Dropout| encoder.forward(&batch, dropout).unwrap();
    let off = Dropout::disabled();
    assert_eq!(common::max_abs_diff(&run(&off), &run(&off)), 0.0);
    let view = |v| {
        Dropout::per_example(
            0.1,
            0.1,
            vec![model::dropout::example_key(1, 0, 0, v), model::dropout::example_key(1, 0, 1, v)],
        )
    };
    assert_eq!(common::max_abs_diff(&run(&view(0)), &run(&view(0))), 0.0, "same keys, same masks");
    assert!(common::max_abs_diff(&run(&view(0)), &run(&view(1))) > 1e-3, "two views must differ");
}

/// A tiny random RoBERTa against transformers' RobertaModel (tests/data/tiny-roberta, made by
/// scripts/make-test-roberta.py): positions start past the padding index, one token type.
#[test]
fn tiny_roberta_matches_transformers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-roberta");
    let device = Device::Cpu;
    let encoder = model::load_encoder(&dir, &device).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &device).unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = expected["attention_mask"].to_dtype(DType::U32).unwrap();
    let batch = kdmcse::data::TokenBatch {
        token_type_ids: ids.zeros_like().unwrap(),
        input_ids: ids,
        attention_mask: mask,
    };
    let ours = encoder.forward(&batch, &Dropout::disabled()).unwrap();
    let reference = &expected["last_hidden_state"];
    // Real tokens only: the two implementations number padding positions differently.
    let real = batch.attention_mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let diff =
        common::max_abs_diff(&ours.broadcast_mul(&real).unwrap(), &reference.broadcast_mul(&real).unwrap());
    assert!(diff < 1e-5, "RoBERTa last hidden states differ by {diff}");
    let scale = common::max_abs_diff(reference, &reference.zeros_like().unwrap());
    assert!(scale > 0.1, "the reference is degenerate ({scale})");
}
