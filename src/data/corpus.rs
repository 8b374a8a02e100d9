//! Training corpora: a text corpus (one sentence a line, like wiki1m, or a field of JSON lines, a
//! CSV/TSV or Parquet column) and a paired corpus in the teacher interchange format (captions with
//! precomputed teacher caption and image features).
//! Both are validated on load; errors name the file and the row.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A corpus by its content, to tell whether two runs or two ranks read the same data: its rows
/// and the SHA-256 of what the trainer reads from them (so blank lines it skips change nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusDigest {
    pub rows: usize,
    pub sha256: String,
}

impl CorpusDigest {
    /// `N <rows> (sha256 <its first 16 digits>)`, rows named by `unit`.
    pub fn describe(&self, unit: &str) -> String {
        format!("{} {unit} (sha256 {})", self.rows, &self.sha256[..self.sha256.len().min(16)])
    }
}

/// Feeds `texts` to `hash`, each with its length first, so that no two lists hash alike by
/// where their items break.
fn hash_texts<'a>(hash: &mut Sha256, texts: impl Iterator<Item = &'a str>) {
    for text in texts {
        hash.update((text.len() as u64).to_le_bytes());
        hash.update(text.as_bytes());
    }
}

/// Sentences from one or more files, in file order.
pub struct TextCorpus {
    pub sentences: Vec<String>,
}

impl TextCorpus {
    /// The sentences of `paths` in order, each read by its format ([`super::text_file`]; `field`
    /// names the JSON field or the column).
    pub fn load(paths: &[PathBuf], field: &str) -> Result<Self> {
        let mut sentences = Vec::new();
        for path in paths {
            let (read, blank) =
                super::text_file::read_sentences(path, field).context("cannot read the text corpus")?;
            if blank > 0 {
                tracing::warn!(file = %path.display(), blank, "skipped blank sentences");
            }
            if read.is_empty() {
                bail!("text corpus {} has no sentences", path.display());
            }
            sentences.extend(read);
        }
        Ok(Self { sentences })
    }

    pub fn len(&self) -> usize {
        self.sentences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sentences.is_empty()
    }

    pub fn digest(&self) -> CorpusDigest {
        let mut hash = Sha256::new();
        hash_texts(&mut hash, self.sentences.iter().map(String::as_str));
        CorpusDigest { rows: self.len(), sha256: hex::encode(hash.finalize()) }
    }
}

/// Captions with their teacher features (teacher/README.md of the shared data): row `i` of
/// `caption_features` is caption `i`; `image_features[caption_image[i]]` is its image. The features
/// stay in the file, memory-mapped: the workers of one node share its pages in the page cache
/// instead of each holding a copy, and a batch converts only its own rows to f32.
pub struct PairedCorpus {
    pub captions: Vec<String>,
    caption_features: MappedMatrix,
    image_features: MappedMatrix,
    pub caption_image: Vec<u32>,
}

/// The features of one paired batch, row `i` belonging to caption `i`.
pub struct PairedBatch<'a> {
    pub captions: Vec<&'a str>,
    pub caption_features: Tensor,
    pub image_features: Tensor,
}

/// A `[rows, dim]` f16, bf16 or f32 matrix of a memory-mapped safetensors file.
struct MappedMatrix {
    map: Arc<Mmap>,
    /// Where its data starts in the map.
    offset: usize,
    rows: usize,
    dim: usize,
    dtype: safetensors::Dtype,
}

impl MappedMatrix {
    /// Tensor `name` of `file`, the safetensors file mapped as `map`; `path` for errors.
    fn of(map: &Arc<Mmap>, file: &SafeTensors, name: &str, path: &Path) -> Result<Self> {
        let view = file.tensor(name).with_context(|| format!("{}: no tensor {name:?}", path.display()))?;
        let [rows, dim] = view.shape() else {
            bail!("{}: {name} must be [rows, dim], is {:?}", path.display(), view.shape());
        };
        let dtype = view.dtype();
        if !matches!(dtype, safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F32) {
            bail!("{}: {name} is {dtype:?}; the features must be f16, bf16 or f32", path.display());
        }
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        Ok(Self { map: Arc::clone(map), offset, rows: *rows, dim: *dim, dtype })
    }

    /// Row `row` as f32.
    fn row(&self, row: usize) -> impl Iterator<Item = f32> + '_ {
        let width = self.dtype.bitsize() / 8;
        let start = self.offset + row * self.dim * width;
        let bytes = &self.map[start..start + self.dim * width];
        let dtype = self.dtype;
        bytes.chunks_exact(width).map(move |b| match dtype {
            safetensors::Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            safetensors::Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        })
    }

    /// The rows `rows`, in order, as an f32 `[rows, dim]` tensor on `device`.
    fn gather(&self, rows: impl Iterator<Item = usize>, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = rows.flat_map(|r| self.row(r)).collect();
        let n = values.len() / self.dim;
        Ok(Tensor::from_vec(values, (n, self.dim), &Device::Cpu)?.to_device(device)?)
    }

    /// Its layout and data, as the file holds them.
    fn hash_into(&self, hash: &mut Sha256) {
        hash.update(format!("{:?} {} {}", self.dtype, self.rows, self.dim));
        let width = self.dtype.bitsize() / 8;
        hash.update(&self.map[self.offset..self.offset + self.rows * self.dim * width]);
    }

    /// The first row holding a NaN or an infinity.
    fn first_non_finite_row(&self) -> Option<usize> {
        (0..self.rows).find(|&r| self.row(r).any(|x| !x.is_finite()))
    }
}

impl PairedCorpus {
    /// Loads `DIR/teacher.safetensors` (memory-mapped), `DIR/captions.txt` and `DIR/images.txt`.
    pub fn load(dir: &Path) -> Result<Self> {
        let features_path = dir.join("teacher.safetensors");
        let file = std::fs::File::open(&features_path)
            .with_context(|| format!("cannot read teacher features {}", features_path.display()))?;
        // SAFETY: the map is read-only and the interchange format is written once, before
        // training; a file changed under a running job is outside what kdmcse supports.
        let map = Arc::new(
            unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map teacher features {}", features_path.display()))?,
        );
        let tensors = SafeTensors::deserialize(&map).with_context(|| {
            format!("cannot read teacher features {}: not a safetensors file", features_path.display())
        })?;
        let caption_features = MappedMatrix::of(&map, &tensors, "caption_features", &features_path)?;
        let image_features = MappedMatrix::of(&map, &tensors, "image_features", &features_path)?;
        let (n_captions, cap_dim) = (caption_features.rows, caption_features.dim);
        let (n_images, img_dim) = (image_features.rows, image_features.dim);
        if cap_dim != img_dim {
            bail!(
                "{}: caption_features have dimension {cap_dim} but image_features {img_dim}",
                features_path.display()
            );
        }
        let caption_image = caption_image(&tensors, &features_path)?;
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
            if let Some(row) = features.first_non_finite_row() {
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

    /// The captions, which image each shows, and both feature matrices.
    pub fn digest(&self) -> CorpusDigest {
        let mut hash = Sha256::new();
        hash_texts(&mut hash, self.captions.iter().map(String::as_str));
        for image in &self.caption_image {
            hash.update(image.to_le_bytes());
        }
        self.caption_features.hash_into(&mut hash);
        self.image_features.hash_into(&mut hash);
        CorpusDigest { rows: self.len(), sha256: hex::encode(hash.finalize()) }
    }

    /// The dimension of the teacher features.
    pub fn dim(&self) -> usize {
        self.caption_features.dim
    }

    /// Captions and features of the given caption rows, features as f32 on `device`.
    pub fn batch(&self, rows: &[u32], device: &Device) -> Result<PairedBatch<'_>> {
        let captions = rows.iter().map(|&r| r as usize);
        let images = rows.iter().map(|&r| self.caption_image[r as usize] as usize);
        Ok(PairedBatch {
            captions: rows.iter().map(|&r| self.captions[r as usize].as_str()).collect(),
            caption_features: self.caption_features.gather(captions, device)?,
            image_features: self.image_features.gather(images, device)?,
        })
    }
}

/// The `caption_image` vector (any integer dtype) of the teacher features `file`.
fn caption_image(file: &SafeTensors, path: &Path) -> Result<Vec<i64>> {
    let view = file
        .tensor("caption_image")
        .with_context(|| format!("{}: no tensor \"caption_image\"", path.display()))?;
    let tensor =
        Tensor::from_raw_buffer(view.data(), DType::try_from(view.dtype())?, view.shape(), &Device::Cpu)?;
    tensor
        .to_dtype(DType::I64)?
        .to_vec1()
        .with_context(|| format!("{}: caption_image must be a vector", path.display()))
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
