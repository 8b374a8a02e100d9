//! Training corpora: a text corpus (one sentence a line, like wiki1m) and a paired corpus in the
//! teacher interchange format (captions with precomputed teacher caption and image features).
//! Both are validated on load; errors name the file and the row.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// Sentences from one or more files, in file order.
pub struct TextCorpus {
    pub sentences: Vec<String>,
}

impl TextCorpus {
    pub fn load(paths: &[PathBuf]) -> Result<Self> {
        let mut sentences = Vec::new();
        for path in paths {
            let lines = super::read_lines(path).context("cannot read the text corpus")?;
            let before = sentences.len();
            let mut blank = 0;
            for line in lines {
                if line.trim().is_empty() {
                    blank += 1;
                } else {
                    sentences.push(line);
                }
            }
            if blank > 0 {
                tracing::warn!(file = %path.display(), blank, "skipped blank lines");
            }
            if sentences.len() == before {
                bail!("text corpus {} has no sentences", path.display());
            }
        }
        Ok(Self { sentences })
    }

    pub fn len(&self) -> usize {
        self.sentences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sentences.is_empty()
    }
}

/// Captions with their teacher features (teacher/README.md of the shared data): row `i` of
/// `caption_features` is caption `i`; `image_features[caption_image[i]]` is its image.
pub struct PairedCorpus {
    pub captions: Vec<String>,
    /// f32 `[captions, dim]`.
    pub caption_features: Tensor,
    /// f32 `[images, dim]`.
    pub image_features: Tensor,
    pub caption_image: Vec<u32>,
}

/// The features of one paired batch, row `i` belonging to caption `i`.
pub struct PairedBatch<'a> {
    pub captions: Vec<&'a str>,
    pub caption_features: Tensor,
    pub image_features: Tensor,
}

impl PairedCorpus {
    /// Loads `DIR/teacher.safetensors`, `DIR/captions.txt` and `DIR/images.txt`.
    pub fn load(dir: &Path) -> Result<Self> {
        let features_path = dir.join("teacher.safetensors");
        let tensors = candle_core::safetensors::load(&features_path, &Device::Cpu)
            .with_context(|| format!("cannot read teacher features {}", features_path.display()))?;
        let get = |name: &str| -> Result<&Tensor> {
            tensors.get(name).with_context(|| format!("{}: no tensor {name:?}", features_path.display()))
        };
        let caption_features = get("caption_features")?.to_dtype(DType::F32)?;
        let image_features = get("image_features")?.to_dtype(DType::F32)?;
        let (n_captions, cap_dim) = caption_features.dims2().with_context(|| {
            format!("{}: caption_features must be [captions, dim]", features_path.display())
        })?;
        let (n_images, img_dim) = image_features
            .dims2()
            .with_context(|| format!("{}: image_features must be [images, dim]", features_path.display()))?;
        if cap_dim != img_dim {
            bail!(
                "{}: caption_features have dimension {cap_dim} but image_features {img_dim}",
                features_path.display()
            );
        }
        let caption_image: Vec<i64> = get("caption_image")?
            .to_dtype(DType::I64)?
            .to_vec1()
            .with_context(|| format!("{}: caption_image must be a vector", features_path.display()))?;
        if caption_image.len() != n_captions {
            bail!(
                "{}: caption_image has {} rows but caption_features {n_captions}",
                features_path.display(),
                caption_image.len()
            );
        }
        let caption_image = caption_image
            .iter()
            .enumerate()
            .map(|(row, &image)| match u32::try_from(image) {
                Ok(i) if (i as usize) < n_images => Ok(i),
                _ => bail!(
                    "{}: caption_image row {row} = {image} is out of range (0..{n_images})",
                    features_path.display()
                ),
            })
            .collect::<Result<Vec<u32>>>()?;
        for (name, features) in [("caption_features", &caption_features), ("image_features", &image_features)]
        {
            let rows = features.to_vec2::<f32>()?;
            if let Some(row) = rows.iter().position(|r| r.iter().any(|x| !x.is_finite())) {
                bail!("{}: {name} row {row} is not finite (NaN or inf)", features_path.display());
            }
        }
        let captions_path = dir.join("captions.txt");
        let captions = super::read_lines(&captions_path)?;
        if captions.len() != n_captions {
            bail!(
                "{} has {} lines but {} has {n_captions} caption_features rows",
                captions_path.display(),
                captions.len(),
                features_path.display()
            );
        }
        if let Some(row) = captions.iter().position(|c| c.trim().is_empty()) {
            bail!("{}:{}: empty caption", captions_path.display(), row + 1);
        }
        let images_path = dir.join("images.txt");
        let images = super::read_lines(&images_path)?.len();
        if images != n_images {
            bail!(
                "{} has {images} lines but {} has {n_images} image_features rows",
                images_path.display(),
                features_path.display()
            );
        }
        Ok(Self { captions, caption_features, image_features, caption_image })
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// The dimension of the teacher features.
    pub fn dim(&self) -> usize {
        self.caption_features.dim(1).expect("2-D features")
    }

    /// Captions and features of the given caption rows, features on `device`.
    pub fn batch(&self, rows: &[u32], device: &Device) -> Result<PairedBatch<'_>> {
        let caption_rows = Tensor::new(rows, &Device::Cpu)?;
        let image_rows: Vec<u32> = rows.iter().map(|&r| self.caption_image[r as usize]).collect();
        let image_rows = Tensor::new(image_rows, &Device::Cpu)?;
        Ok(PairedBatch {
            captions: rows.iter().map(|&r| self.captions[r as usize].as_str()).collect(),
            caption_features: self.caption_features.index_select(&caption_rows, 0)?.to_device(device)?,
            image_features: self.image_features.index_select(&image_rows, 0)?.to_device(device)?,
        })
    }
}

/// Writes a paired corpus in the teacher interchange format (the layout [`PairedCorpus::load`]
/// reads): features stored as f16, captions with whitespace runs collapsed.
pub fn write_paired(
    dir: &Path,
    captions: &[String],
    caption_features: &Tensor,
    image_names: &[String],
    image_features: &Tensor,
    caption_image: &[u32],
    metadata: &[(&str, String)],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = [
        ("image_features", image_features.to_dtype(DType::F16)?),
        ("caption_features", caption_features.to_dtype(DType::F16)?),
        (
            "caption_image",
            Tensor::new(caption_image.iter().map(|&i| i as i64).collect::<Vec<_>>(), &Device::Cpu)?,
        ),
    ];
    let metadata = metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let path = dir.join("teacher.safetensors");
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (*k, t)), Some(metadata))?;
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    let collapse = |s: &String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let lines = |items: &[String]| items.iter().map(collapse).collect::<Vec<_>>().join("\n") + "\n";
    std::fs::write(dir.join("captions.txt"), lines(captions))?;
    std::fs::write(dir.join("images.txt"), lines(image_names))?;
    Ok(())
}
