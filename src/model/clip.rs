//! The frozen CLIP teacher (candle-transformers' CLIP) loaded from a Hugging Face folder
//! (`config.json` of a `CLIPModel`, `model.safetensors`, `tokenizer.json`, optionally
//! `preprocessor_config.json`), with CLIP's image preprocessing. It only runs in `kdmcse
//! precompute`; training reads the features it wrote.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::clip::{self, text_model::Activation, ClipModel};
use serde::Deserialize;

#[derive(Deserialize)]
struct TextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
}

#[derive(Deserialize)]
struct VisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "three")]
    num_channels: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
}

#[derive(Deserialize)]
struct HfClipConfig {
    text_config: TextConfig,
    vision_config: VisionConfig,
    projection_dim: usize,
    #[serde(default = "logit_scale")]
    logit_scale_init_value: f32,
}

#[derive(Deserialize, Default)]
struct Preprocessor {
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn three() -> usize {
    3
}
fn logit_scale() -> f32 {
    2.6592
}

/// CLIP's normalisation constants (OpenAI's).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

pub struct ClipTeacher {
    model: ClipModel,
    tokenizer: tokenizers::Tokenizer,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    /// Pads text batches; CLIP pools at the end-of-text token, the largest id, which padding
    /// after it cannot reach through the causal mask.
    pad_id: u32,
    device: Device,
    pub projection_dim: usize,
}

impl ClipTeacher {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let hf = HfClipConfig::read(dir)?;
        let (t, v) = (&hf.text_config, &hf.vision_config);
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            bail!("no weights in {}: expected model.safetensors", dir.display());
        }
        // SAFETY: the file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        // candle draws a missing class embedding at random, which would make the teacher's
        // features differ from run to run: require it.
        let class_embedding = "vision_model.embeddings.class_embedding";
        if !vb.contains_tensor(class_embedding) {
            bail!("{}: no tensor {class_embedding}", weights.display());
        }
        let model = ClipModel::new(vb, &hf.candle_config())
            .with_context(|| format!("{}: weights do not fit config.json", dir.display()))?;
        let preprocessor: Preprocessor = match std::fs::read_to_string(dir.join("preprocessor_config.json")) {
            Ok(text) => serde_json::from_str(&text).context("unreadable preprocessor_config.json")?,
            Err(_) => Preprocessor::default(),
        };
        Ok(Self {
            model,
            tokenizer: load_tokenizer(dir, t.max_position_embeddings)?,
            image_size: v.image_size,
            mean: preprocessor.image_mean.unwrap_or(CLIP_MEAN),
            std: preprocessor.image_std.unwrap_or(CLIP_STD),
            pad_id: (t.vocab_size - 1) as u32,
            device: device.clone(),
            projection_dim: hf.projection_dim,
        })
    }

    /// Projected text features `[n, projection_dim]` (not normalised).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| anyhow!("tokenizer: {e}"))?;
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(1);
        let mut ids = vec![self.pad_id; texts.len() * len];
        for (i, e) in encodings.iter().enumerate() {
            ids[i * len..i * len + e.get_ids().len()].copy_from_slice(e.get_ids());
        }
        let ids = Tensor::from_vec(ids, (texts.len(), len), &self.device)?;
        Ok(self.model.get_text_features(&ids)?)
    }

    /// Projected image features `[n, projection_dim]` (not normalised).
    pub fn embed_images(&self, paths: &[&Path]) -> Result<Tensor> {
        let pixels = paths.iter().map(|p| self.preprocess(p)).collect::<Result<Vec<_>>>()?;
        self.embed_pixels(&Tensor::stack(&pixels, 0)?)
    }

    /// Projected image features of preprocessed images `[n, 3, size, size]`.
    pub fn embed_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.model.get_image_features(pixels)?)
    }

    /// CLIP's preprocessing: shortest side resized to the input size (bicubic), centre crop,
    /// scaled to [0, 1] and normalised per channel. `[3, size, size]`.
    pub fn preprocess(&self, path: &Path) -> Result<Tensor> {
        let img =
            image::open(path).with_context(|| format!("cannot read image {}", path.display()))?.to_rgb8();
        let size = self.image_size as u32;
        let (w, h) = img.dimensions();
        let scale = size as f32 / w.min(h) as f32;
        let (nw, nh) =
            (((w as f32 * scale).round() as u32).max(size), ((h as f32 * scale).round() as u32).max(size));
        let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::CatmullRom);
        let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
        let crop = image::imageops::crop_imm(&resized, x0, y0, size, size).to_image();
        let n = (size * size) as usize;
        let mut data = vec![0f32; 3 * n];
        for (i, pixel) in crop.pixels().enumerate() {
            for c in 0..3 {
                data[c * n + i] = (pixel[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, size as usize, size as usize), &self.device)?)
    }
}

impl HfClipConfig {
    /// `dir/config.json`, which must be a CLIPModel's with quick_gelu (candle's CLIP has no other).
    fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read CLIP config {}", config_path.display()))?;
        let hf: HfClipConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Hugging Face CLIPModel config", config_path.display()))?;
        for act in [&hf.text_config.hidden_act, &hf.vision_config.hidden_act] {
            if act != "quick_gelu" {
                bail!(
                    "{}: hidden_act {act:?} is not supported (CLIP uses quick_gelu)",
                    config_path.display()
                );
            }
        }
        Ok(hf)
    }

    /// candle's config of the same model.
    fn candle_config(&self) -> clip::ClipConfig {
        let (t, v) = (&self.text_config, &self.vision_config);
        clip::ClipConfig {
            text_config: clip::text_model::ClipTextConfig {
                vocab_size: t.vocab_size,
                embed_dim: t.hidden_size,
                activation: Activation::QuickGelu,
                intermediate_size: t.intermediate_size,
                max_position_embeddings: t.max_position_embeddings,
                pad_with: None,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: t.num_attention_heads,
                projection_dim: self.projection_dim,
            },
            vision_config: clip::vision_model::ClipVisionConfig {
                embed_dim: v.hidden_size,
                activation: Activation::QuickGelu,
                intermediate_size: v.intermediate_size,
                num_hidden_layers: v.num_hidden_layers,
                num_attention_heads: v.num_attention_heads,
                projection_dim: self.projection_dim,
                num_channels: v.num_channels,
                image_size: v.image_size,
                patch_size: v.patch_size,
            },
            logit_scale_init_value: self.logit_scale_init_value,
            image_size: v.image_size,
        }
    }
}

/// `dir/tokenizer.json`, unpadded, cutting captions to the `max_len` positions CLIP has.
fn load_tokenizer(dir: &Path, max_len: usize) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(tokenizer)
}
