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
        let hidden = encoder
            .forward(&batch.input_ids, &batch.token_type_ids, &batch.attention_mask, &Dropout::disabled())
            .unwrap();
        for (name, pooling) in [("cls", Pooling::Cls), ("mean", Pooling::Avg)] {
            let ours = pooling.pool(&hidden, &batch.attention_mask).unwrap();
            let expected: &Tensor = &golden[&format!("{setting}/{name}")];
            let diff = common::max_abs_diff(&ours, expected);
            assert!(diff < 1e-4, "{setting}/{name}: max abs diff {diff}");
            let embedded = encoder
                .embed(
                    &batch.input_ids,
                    &batch.token_type_ids,
                    &batch.attention_mask,
                    &Dropout::disabled(),
                    pooling,
                )
                .unwrap();
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
    let run = |dropout: &Dropout| {
        encoder.forward(&batch.input_ids, &batch.token_type_ids, &batch.attention_mask, dropout).unwrap()
    };
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
