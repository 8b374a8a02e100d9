//! `kdmcse precompute` with a small random-weight CLIP saved in the Hugging Face layout, on the
//! COCO val2017 sample images and their captions: the output loads as a paired corpus, maps each
//! caption to its image, and holds the teacher's features.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::{self, text_model::Activation, ClipModel};
use kdmcse::data::PairedCorpus;
use kdmcse::model::clip::ClipTeacher;

const WORDS: &[&str] = &[
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "man", "woman", "people", "person",
    "dog", "cat", "table", "street", "room", "sitting", "standing", "white", "black", "red", "two", "large",
    "small", "next", "to", "at", ".", ",",
];

/// A tiny CLIP (2 layers, width 32, 32 px images, projection 16) with a word-level tokenizer.
fn write_tiny_clip(dir: &Path) {
    let vocab = WORDS.len() + 3; // [UNK], the words, <|startoftext|>, <|endoftext|> (the largest id)
    let config = serde_json::json!({
        "architectures": ["CLIPModel"],
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37, "max_position_embeddings": 77,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let cfg = clip::ClipConfig {
        text_config: clip::text_model::ClipTextConfig {
            vocab_size: vocab,
            embed_dim: 32,
            activation: Activation::QuickGelu,
            intermediate_size: 37,
            max_position_embeddings: 77,
            pad_with: None,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 16,
        },
        vision_config: clip::vision_model::ClipVisionConfig {
            embed_dim: 32,
            activation: Activation::QuickGelu,
            intermediate_size: 37,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 16,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
        },
        logit_scale_init_value: 2.6592,
        image_size: 32,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // A parameter candle would otherwise draw at random on every load (it is in real checkpoints).
    let init = candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 };
    vb.pp("vision_model.embeddings").get_with_hints(32, "class_embedding", init).unwrap();
    ClipModel::new(vb, &cfg).unwrap();
    varmap.save(dir.join("model.safetensors")).unwrap();
    let mut ids = serde_json::Map::new();
    ids.insert("[UNK]".into(), 0.into());
    for (i, w) in WORDS.iter().enumerate() {
        ids.insert((*w).into(), (i + 1).into());
    }
    let (bos, eos) = (vocab - 2, vocab - 1);
    ids.insert("<|startoftext|>".into(), bos.into());
    ids.insert("<|endoftext|>".into(), eos.into());
    let special = |name: &str, id: usize| serde_json::json!({"id": name, "ids": [id], "tokens": [name]});
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|startoftext|>": special("<|startoftext|>", bos), "<|endoftext|>": special("<|endoftext|>", eos)}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

fn precompute(clip: &Path, captions: &Path, images: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kdmcse"))
        .args(["precompute", "--clip", clip.to_str().unwrap(), "--captions", captions.to_str().unwrap()])
        .args(["--images", images.to_str().unwrap(), "--out", out.to_str().unwrap(), "--batch-size", "16"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn coco_sample_features_in_the_interchange_format() {
    let dir = tempfile::tempdir().unwrap();
    let clip_dir = dir.path().join("clip");
    std::fs::create_dir_all(&clip_dir).unwrap();
    write_tiny_clip(&clip_dir);
    let coco = common::shared_dir().join("data/coco");
    let images = coco.join("images_val2017_sample");
    let out = dir.path().join("teacher");
    let result = precompute(&clip_dir, &coco.join("captions_val2017.json"), &images, &out);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));

    let corpus = PairedCorpus::load(&out).unwrap();
    let image_ids: Vec<u64> = std::fs::read_to_string(out.join("images.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let files = std::fs::read_dir(&images).unwrap().count();
    assert_eq!(image_ids.len(), files, "every sample image has captions");
    assert!(image_ids.windows(2).all(|w| w[0] < w[1]), "images in id order");
    // The expected captions: those of the sample images, grouped by image, in annotation order.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(coco.join("captions_val2017.json")).unwrap()).unwrap();
    let mut annotations: Vec<&serde_json::Value> = json["annotations"].as_array().unwrap().iter().collect();
    annotations.sort_by_key(|a| a["id"].as_u64());
    let mut expected = Vec::new();
    for (row, id) in image_ids.iter().enumerate() {
        for a in annotations.iter().filter(|a| a["image_id"].as_u64() == Some(*id)) {
            expected.push((
                a["caption"].as_str().unwrap().split_whitespace().collect::<Vec<_>>().join(" "),
                row as u32,
            ));
        }
    }
    let ours: Vec<(String, u32)> =
        corpus.captions.iter().cloned().zip(corpus.caption_image.iter().copied()).collect();
    assert_eq!(ours, expected);
    assert_eq!(corpus.dim(), 16);

    // The stored features are the teacher's (up to f16 storage).
    let teacher = ClipTeacher::load(&clip_dir, &Device::Cpu).unwrap();
    let file = images.join(format!("{:012}.jpg", image_ids[3]));
    let image = teacher.embed_images(&[file.as_path()]).unwrap();
    let caption = teacher.embed_texts(&[corpus.captions[5].as_str()]).unwrap();
    let close = |a: &Tensor, b: &Tensor| {
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        common::max_abs_diff(a, b) <= 2e-3 * scale.max(1.0)
    };
    assert!(close(&image, &corpus.image_features.narrow(0, 3, 1).unwrap()), "image features");
    assert!(close(&caption, &corpus.caption_features.narrow(0, 5, 1).unwrap()), "caption features");
    // Different images, different features.
    assert!(
        common::max_abs_diff(&corpus.image_features.get(0).unwrap(), &corpus.image_features.get(1).unwrap())
            > 1e-4
    );
}

#[test]
fn a_missing_image_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let clip_dir = dir.path().join("clip");
    std::fs::create_dir_all(&clip_dir).unwrap();
    write_tiny_clip(&clip_dir);
    let images = common::shared_dir().join("data/coco/images_val2017_sample");
    let list = dir.path().join("captions.tsv");
    std::fs::write(&list, "000000000139.jpg\ta room with a table .\nnot-there.jpg\ta dog .\n").unwrap();
    let result = precompute(&clip_dir, &list, &images, &dir.path().join("out"));
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains(&format!("{}:2", list.display())) && err.contains("not-there.jpg"), "{err}");
}
