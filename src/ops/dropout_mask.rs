//! The dropout mask: inverted-dropout factors (0 or 1/(1-p)) that are a hash of (row key, site,
//! the element's coordinates within its row), made where the tensor lives (kernels/dropout.cu on
//! a GPU), identical on every device. `model::dropout` decides the keys and sites.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;

/// The mask of site `site` for `xs` (first dimension the batch, one key per row; at most 3 more
/// dimensions, each below 2^20), shaped and typed like `xs`. A row's `origin` (0 without
/// `origins`) is added to each of its elements' packed coordinates: a row that is one slice of a
/// larger one (a packed token of a sentence) gets that slice's mask.
pub(crate) fn dropout_mask(
    xs: &Tensor,
    keys: &[u64],
    origins: Option<&[u64]>,
    site: u64,
    p: f32,
) -> Result<Tensor> {
    let rows = xs.dim(0)?;
    if keys.len() != rows || origins.is_some_and(|o| o.len() != rows) {
        candle_core::bail!("dropout: {} row keys for a batch of {rows}", keys.len());
    }
    if xs.rank() > 4 || xs.dims()[1..].iter().any(|&d| d >= 1 << 20) {
        candle_core::bail!("dropout: masks cover [batch, <= 3 dims of < 2^20], got {:?}", xs.dims());
    }
    xs.apply_op1_no_bwd(&Mask { keys, origins, site, p })
}

/// A row's coordinate origin that makes it the slice `index` of dimension `dim` (0 outermost of
/// three) of a larger row: the token at `position` of a `[len, hidden]` sentence row is
/// `origin(1, position)` of a `[hidden]` row.
pub(crate) fn origin(dim: usize, index: usize) -> u64 {
    (index as u64) << (20 * (2 - dim))
}

/// The mask tensor of one site, shaped and typed like its input (whose values it ignores).
struct Mask<'a> {
    keys: &'a [u64],
    origins: Option<&'a [u64]>,
    site: u64,
    p: f32,
}

/// A dropped element's uniform 24-bit draw is below the threshold; kept ones are scaled.
pub(super) fn threshold_and_scale(p: f32) -> (u64, f32) {
    ((p as f64 * (1u64 << 24) as f64).round() as u64, 1.0 / (1.0 - p))
}

/// The leading-1-padded `[d0, d1, d2]` of a row of shape `row_dims`.
fn row_extent(row_dims: &[usize]) -> [usize; 3] {
    let mut dims = [1usize; 3];
    dims[3 - row_dims.len()..].copy_from_slice(row_dims);
    dims
}

impl CustomOp1 for Mask<'_> {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mask = mask_values(self.keys, self.origins, self.site, &layout.dims()[1..], self.p);
        let storage = match storage.dtype() {
            DType::F32 => CpuStorage::F32(mask),
            DType::F64 => CpuStorage::F64(mask.into_iter().map(f64::from).collect()),
            DType::BF16 => CpuStorage::BF16(mask.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(mask.into_iter().map(half::f16::from_f32).collect()),
            dtype => candle_core::bail!("dropout on {dtype:?}: a float dtype is needed"),
        };
        Ok((storage, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let device = storage.device();
        let scale = threshold_and_scale(self.p).1;
        let (f16, bf16) = (half::f16::from_f32(scale).to_bits(), half::bf16::from_f32(scale).to_bits());
        let mask = match storage.dtype() {
            DType::F32 => self.cuda_mask::<f32, u32>(device, layout, "dropout_mask_32", scale.to_bits())?,
            DType::F64 => {
                self.cuda_mask::<f64, u64>(device, layout, "dropout_mask_64", f64::from(scale).to_bits())?
            }
            DType::BF16 => self.cuda_mask::<half::bf16, u16>(device, layout, "dropout_mask_16", bf16)?,
            DType::F16 => self.cuda_mask::<half::f16, u16>(device, layout, "dropout_mask_16", f16)?,
            dtype => candle_core::bail!("dropout on {dtype:?}: a float dtype is needed"),
        };
        Ok((mask, layout.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
impl Mask<'_> {
    /// A new mask of `layout`'s shape from `kernel` (the one for `T`'s width), whose kept
    /// elements get the bit pattern `kept`.
    fn cuda_mask<T, Bits>(
        &self,
        device: &candle_core::CudaDevice,
        layout: &Layout,
        kernel: &str,
        kept: Bits,
    ) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
        Bits: candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;

        let (rows, extent) = (layout.dims()[0] as u32, row_extent(&layout.dims()[1..]));
        let [d0, d1, d2] = extent.map(|d| d as u32);
        let n = layout.shape().elem_count();
        let threshold = threshold_and_scale(self.p).0;
        let keys = device.clone_htod(self.keys)?;
        let origins = match self.origins {
            Some(origins) => device.clone_htod(origins)?,
            None => device.clone_htod(&vec![0u64; self.keys.len()])?,
        };
        // SAFETY: the kernel writes each of the n elements.
        let mut out = unsafe { device.alloc::<T>(n)? };
        let kernel = crate::kernels::Kernel::load(device, crate::kernels::DROPOUT, kernel)?;
        let mut args = kernel.args();
        args.arg(&keys).arg(&origins).arg(&self.site).arg(&rows).arg(&d0).arg(&d1).arg(&d2);
        args.arg(&threshold).arg(&kept).arg(&mut out);
        // SAFETY: the arguments follow dropout.cu's signature; `out` holds the n elements.
        unsafe { kernel.launch(args, cuda::elementwise(n))? };
        Ok(cuda::output(out, device))
    }
}

/// Inverted-dropout mask values (0 or 1/(1-p)) for rows of shape `row_dims`, one key (and
/// coordinate origin) per row.
fn mask_values(keys: &[u64], origins: Option<&[u64]>, site: u64, row_dims: &[usize], p: f32) -> Vec<f32> {
    let per_row: usize = row_dims.iter().product();
    let (threshold, scale) = threshold_and_scale(p);
    let dims = row_extent(row_dims);
    // SAFETY: each piece is one row, and the kernel writes its d0 x d1 = its runs of d2 elements.
    unsafe {
        super::written_in_pieces(
            keys.len() * per_row,
            per_row,
            #[inline(always)]
            |i, row: &mut [MaybeUninit<f32>]| {
                let (row_key, origin) = (mix(keys[i] ^ mix(site)), origins.map_or(0, |o| o[i]));
                // Coordinates packed 20 bits each (innermost lowest): the same element gets the same
                // draw whatever the extent of the other dimensions. Within a run of the innermost one
                // they count up by one, since `c < 2^20` makes `outer | c == outer + c`.
                let mut runs = row.chunks_exact_mut(dims[2]);
                for a in 0..dims[0] as u64 {
                    for b in 0..dims[1] as u64 {
                        let first = origin.wrapping_add((a << 40) | (b << 20));
                        let run = runs.next().expect("mask row sized by its dims");
                        mask_run(run, MaskRun { row_key, first, threshold, scale });
                    }
                }
            },
        )
    }
}

/// One run of consecutive coordinates `first, first + 1, ...` of a row's mask.
#[derive(Clone, Copy)]
pub(super) struct MaskRun {
    pub(super) row_key: u64,
    pub(super) first: u64,
    pub(super) threshold: u64,
    pub(super) scale: f32,
}

/// Writes every element of `out` (inlined into the caller's kernel, which chose the vector
/// extensions: AVX-512 has a 64-bit vector multiply, eight hashes at a time).
#[inline(always)]
pub(super) fn mask_run(out: &mut [MaybeUninit<f32>], run: MaskRun) {
    for (c, o) in out.iter_mut().enumerate() {
        let coords = run.first.wrapping_add(c as u64);
        let draw = mix(run.row_key.wrapping_add(coords.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40;
        o.write(if draw >= run.threshold { run.scale } else { 0.0 });
    }
}

/// splitmix64's finaliser: a bijective 64-bit mix with good avalanche.
#[inline(always)]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dropout::{example_key, Site};

    #[test]
    fn drop_rate_and_scale() {
        let keys: Vec<u64> = (0..8).map(|i| example_key(1234, 0, i, 0)).collect();
        let mask = mask_values(&keys, None, Site::Embeddings.id(), &[10_000], 0.1);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "drop rate {dropped}");
        let kept = mask.iter().find(|&&m| m != 0.0).unwrap();
        assert!((kept - 1.0 / 0.9).abs() < 1e-6);
    }

    #[test]
    fn masks_depend_only_on_the_row_key() {
        let keys: Vec<u64> = (0..4).map(|i| example_key(7, 3, i, 1)).collect();
        let all = mask_values(&keys, None, 5, &[64], 0.1);
        let last_alone = mask_values(&keys[3..], None, 5, &[64], 0.1);
        assert_eq!(&all[3 * 64..], &last_alone[..]);
        let other_view = mask_values(&[example_key(7, 3, 3, 0)], None, 5, &[64], 0.1);
        assert_ne!(last_alone, other_view);
    }

    /// dropout.cu, compiled for the host, gives `mask_values` bit for bit: the GPU kernel's
    /// arithmetic is checked without a GPU.
    #[test]
    fn cuda_kernel_computes_the_cpu_masks() {
        let dir = tempfile::tempdir().unwrap();
        let exe = crate::kernels::host::compile(
            dir.path(),
            crate::kernels::DROPOUT,
            r#"int main(int argc, char **argv) {
    u64 site = strtoull(argv[1], 0, 10), threshold = strtoull(argv[6], 0, 10);
    unsigned rows = atoi(argv[2]), d0 = atoi(argv[3]), d1 = atoi(argv[4]), d2 = atoi(argv[5]);
    unsigned kept = strtoul(argv[7], 0, 10);
    std::vector<u64> keys, origins;
    for (unsigned i = 0; i < rows; i++) keys.push_back(strtoull(argv[8 + i], 0, 10));
    for (unsigned i = 0; i < rows; i++) origins.push_back(strtoull(argv[8 + rows + i], 0, 10));
    std::vector<unsigned> out((size_t)rows * d0 * d1 * d2);
    u64 *k = keys.data(), *r = origins.data();
    unsigned *o = out.data();
    launch(blocks_for(out.size(), ELEMENTWISE_THREADS), ELEMENTWISE_THREADS,
           [&] { dropout_mask_32(k, r, site, rows, d0, d1, d2, threshold, kept, o); });
    for (unsigned v : out) printf("%u\n", v);
}"#,
        );
        let keys: Vec<u64> = (0..3).map(|i| example_key(1234, 5, i, i % 2)).collect();
        let origins: Vec<u64> = (0..3).map(|i| origin(1, 2 * i)).collect();
        for (row_dims, p, site, origins) in [
            (vec![2, 5, 7], 0.1, 14, None),
            (vec![6, 40], 0.5, 3, None),
            (vec![9], 0.1, 1, None),
            (vec![9], 0.1, 1, Some(&origins[..])),
        ] {
            let (threshold, scale) = threshold_and_scale(p);
            let extent = row_extent(&row_dims);
            let args: Vec<String> = [site.to_string(), keys.len().to_string()]
                .into_iter()
                .chain(extent.map(|d| d.to_string()))
                .chain([threshold.to_string(), scale.to_bits().to_string()])
                .chain(keys.iter().map(u64::to_string))
                .chain((0..keys.len()).map(|i| origins.map_or(0, |o| o[i]).to_string()))
                .collect();
            let gpu = crate::kernels::host::run(&exe, &args, &[]);
            let cpu = mask_values(&keys, origins, site, &row_dims, p);
            assert_eq!(gpu, cpu, "{row_dims:?}, p {p}, origins {origins:?}");
        }
    }

    /// A sentence's tokens as rows of their own, each with its position as origin, get the
    /// sentence row's mask: packing a padded batch changes no mask.
    #[test]
    fn packed_tokens_get_their_sentence_rows_mask() {
        let (key, hidden) = (example_key(3, 1, 4, 1), 48);
        let sentence = mask_values(&[key], None, 6, &[5, hidden], 0.5);
        let origins: Vec<u64> = (0..5).map(|position| origin(1, position)).collect();
        let tokens = mask_values(&[key; 5], Some(&origins), 6, &[hidden], 0.5);
        assert_eq!(sentence, tokens);
    }

    #[test]
    fn padding_changes_no_mask() {
        // Attention probabilities [heads, queries, keys] padded from 5 to 9 positions.
        let keys = [example_key(1, 2, 3, 0)];
        let short = mask_values(&keys, None, 9, &[2, 5, 5], 0.5);
        let long = mask_values(&keys, None, 9, &[2, 9, 9], 0.5);
        for (h, q, k) in (0..2).flat_map(|h| (0..5).flat_map(move |q| (0..5).map(move |k| (h, q, k)))) {
            assert_eq!(short[(h * 5 + q) * 5 + k], long[(h * 9 + q) * 9 + k], "({h}, {q}, {k})");
        }
    }
}
