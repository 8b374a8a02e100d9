//! The CLIP teacher against transformers' CLIPModel on a tiny random model, and `kdmcse
//! precompute` with that model on the COCO val2017 sample images and their captions: the output
//! loads as a paired corpus, maps each caption to its image, and holds the teacher's features.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use kdmcse::data::PairedCorpus;
use kdmcse::model::clip::ClipTeacher;

/// A tiny random CLIP in the Hugging Face layout with a word-level tokenizer, and transformers'
/// outputs on it (made by scripts/make-test-clip.py).
fn tiny_clip() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-clip")
}

/// Mean absolute difference allowed between our preprocessing and CLIPImageProcessor's, in
/// normalised units (one grey level is about 0.015).
const PIXEL_MEAN_DIFF: f32 = 0.005;

/// Largest absolute difference, relative to the largest magnitude of `expected` (at least 1).
fn relative_diff(ours: &Tensor, expected: &Tensor) -> f64 {
    let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    common::max_abs_diff(ours, expected) / scale.max(1.0)
}

#[test]
fn the_teacher_matches_hugging_face_clip() {
    let dir = tiny_clip();
    let teacher = ClipTeacher::load(&dir, &Device::Cpu).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let get = |name: String| expected.get(&name).unwrap_or_else(|| panic!("no {name}")).clone();

    // Captions of different lengths in one padded batch, each against transformers unpadded.
    let captions: Vec<&str> =
        meta["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let ours = teacher.embed_texts(&captions).unwrap();
    for i in 0..captions.len() {
        let diff = relative_diff(&ours.narrow(0, i, 1).unwrap(), &get(format!("caption_{i}.features")));
        assert!(diff < 1e-5, "caption {i}: {diff}");
    }
    // Images: the vision tower on transformers' pixels; our preprocessing against
    // CLIPImageProcessor's (PIL's bicubic resampling and the image crate's Catmull-Rom differ by a
    // grey level here and there: measured mean |diff| 0.0008-0.0009, features within 0.16%).
    let images = common::shared_dir().join("data/coco/images_val2017_sample");
    for (i, name) in meta["images"].as_array().unwrap().iter().enumerate() {
        let pixels = get(format!("image_{i}.pixel_values"));
        let features = get(format!("image_{i}.features"));
        let diff = relative_diff(&teacher.embed_pixels(&pixels).unwrap(), &features);
        assert!(diff < 1e-5, "image {i} from transformers' pixels: {diff}");
        let path = images.join(name.as_str().unwrap());
        let ours = teacher.preprocess(&path).unwrap().unsqueeze(0).unwrap();
        let mean_diff =
            (&ours - &pixels).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean_diff < PIXEL_MEAN_DIFF, "image {i} preprocessing: mean |diff| {mean_diff}");
        let diff = relative_diff(&teacher.embed_images(&[path.as_path()]).unwrap(), &features);
        assert!(diff < 0.01, "image {i} end to end: {diff}");
    }
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
    let clip_dir = tiny_clip();
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
    // A batch reads them from the mapped file: caption 5's, and a caption of image 3's image.
    let of_image = |image: u32| corpus.caption_image.iter().position(|&i| i == image).unwrap() as u32;
    let batch = corpus.batch(&[5, of_image(3)], &Device::Cpu).unwrap();
    assert!(close(&caption, &batch.caption_features.narrow(0, 0, 1).unwrap()), "caption features");
    assert!(close(&image, &batch.image_features.narrow(0, 1, 1).unwrap()), "image features");
    // Different images, different features.
    let images = corpus.batch(&[of_image(0), of_image(1)], &Device::Cpu).unwrap().image_features;
    assert!(common::max_abs_diff(&images.get(0).unwrap(), &images.get(1).unwrap()) > 1e-4);
}

#[test]
fn a_missing_image_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let clip_dir = tiny_clip();
    let images = common::shared_dir().join("data/coco/images_val2017_sample");
    let list = dir.path().join("captions.tsv");
    std::fs::write(&list, "000000000139.jpg\ta room with a table .\nnot-there.jpg\ta dog .\n").unwrap();
    let result = precompute(&clip_dir, &list, &images, &dir.path().join("out"));
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains(&format!("{}:2", list.display())) && err.contains("not-there.jpg"), "{err}");
}
