//! Row gathers that pack a padded batch's tokens and pad them back: output row `i` is input row
//! `rows[i]`, or zeros. Each input row is read at most once, so the backward of a gather is the
//! gather the other way (no accumulation), and the two are each other's gradient.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, WithDType};

/// Marks an output row that is zeros.
const ZERO_ROW: u32 = u32::MAX;

/// A gather of rows (a tensor's first dimension), with its transpose for the backward.
#[derive(Debug, Clone)]
pub struct RowGather {
    /// For each output row, the input row it copies, or `ZERO_ROW`.
    rows: Arc<[u32]>,
    /// For each input row, the output row that copies it, or `ZERO_ROW`.
    back: Arc<[u32]>,
    /// `rows` with zero rows pointing one past the input (to a zero row the fallback appends),
    /// where the tensors live.
    on_device: Tensor,
}

impl RowGather {
    /// The gather whose output row `i` is input row `rows[i]` (`None`: zeros) of an input with
    /// `input_rows` rows; no input row may be read twice.
    pub fn new(rows: &[Option<usize>], input_rows: usize, device: &Device) -> Result<Self> {
        let mut back = vec![ZERO_ROW; input_rows];
        for (out, row) in rows.iter().enumerate() {
            let Some(row) = *row else { continue };
            match back.get_mut(row) {
                Some(slot) if *slot == ZERO_ROW => *slot = out as u32,
                Some(_) => candle_core::bail!("gather: input row {row} is read twice"),
                None => candle_core::bail!("gather: input row {row} of {input_rows}"),
            }
        }
        let rows: Vec<u32> = rows.iter().map(|r| r.map_or(ZERO_ROW, |r| r as u32)).collect();
        Self::from_maps(rows.into(), back.into(), device)
    }

    fn from_maps(rows: Arc<[u32]>, back: Arc<[u32]>, device: &Device) -> Result<Self> {
        let input_rows = back.len() as u32;
        let padded: Vec<u32> = rows.iter().map(|&r| if r == ZERO_ROW { input_rows } else { r }).collect();
        let on_device = Tensor::from_vec(padded, rows.len(), device)?;
        Ok(Self { rows, back, on_device })
    }

    /// The gather that puts every row back where this one took it from (zeros elsewhere).
    pub fn transposed(&self) -> Result<Self> {
        Self::from_maps(self.back.clone(), self.rows.clone(), self.on_device.device())
    }
}

/// The rows of `xs` (any shape; rows are its first dimension) that `gather` selects, in its
/// order. Differentiable; on the CPU one pass split across threads, elsewhere candle's
/// `index_select` on `xs` with a zero row appended.
pub fn gather_rows(xs: &Tensor, gather: &RowGather) -> Result<Tensor> {
    let input_rows = xs.dim(0)?;
    if input_rows != gather.back.len() {
        candle_core::bail!("gather: {input_rows} rows for a gather of {}", gather.back.len());
    }
    if xs.device().is_cpu() {
        return xs.contiguous()?.apply_op1(gather.clone());
    }
    let mut zero_dims = xs.dims().to_vec();
    zero_dims[0] = 1;
    let with_zero = Tensor::cat(&[xs, &Tensor::zeros(zero_dims, xs.dtype(), xs.device())?], 0)?;
    with_zero.index_select(&gather.on_device, 0)
}

/// Output row `i` of `rows.len()` is input row `rows[i]` (each `width` elements), or zeros.
fn gather_cpu<T: WithDType>(input: &[T], rows: &[u32], width: usize) -> Vec<T> {
    if width == 0 {
        return Vec::new();
    }
    // Rows in pieces of at least 64 KiB, so small gathers stay on one thread.
    let per_piece = (16384 / width).max(1);
    let write = |piece: usize, out: &mut [std::mem::MaybeUninit<T>]| {
        for (out, &row) in out.chunks_exact_mut(width).zip(&rows[piece * per_piece..]) {
            if row == ZERO_ROW {
                out.iter_mut().for_each(|x| _ = x.write(T::zero()));
            } else {
                let start = row as usize * width;
                out.write_copy_of_slice(&input[start..start + width]);
            }
        }
    };
    // SAFETY: each piece is whole rows, and `write` writes every element of each.
    unsafe { super::written_in_pieces(rows.len() * width, per_piece * width, write) }
}

impl CustomOp1 for RowGather {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gather: input must be contiguous")
        };
        let mut dims = layout.dims().to_vec();
        let width = (end - start).checked_div(dims[0]).unwrap_or(0);
        dims[0] = self.rows.len();
        let rows = &self.rows;
        let out = match storage {
            CpuStorage::F32(data) => CpuStorage::F32(gather_cpu(&data[start..end], rows, width)),
            CpuStorage::F64(data) => CpuStorage::F64(gather_cpu(&data[start..end], rows, width)),
            CpuStorage::BF16(data) => CpuStorage::BF16(gather_cpu(&data[start..end], rows, width)),
            CpuStorage::F16(data) => CpuStorage::F16(gather_cpu(&data[start..end], rows, width)),
            CpuStorage::U32(data) => CpuStorage::U32(gather_cpu(&data[start..end], rows, width)),
            other => candle_core::bail!("gather: {:?} is not supported", other.dtype()),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, _xs: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gather_rows(grad_out, &self.transposed()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn gathers_rows_and_zeros_and_differentiates_to_the_transpose() {
        let device = Device::Cpu;
        let xs =
            Var::from_tensor(&Tensor::arange(0f32, 12.0, &device).unwrap().reshape((4, 3)).unwrap()).unwrap();
        let gather = RowGather::new(&[Some(2), None, Some(0), Some(3)], 4, &device).unwrap();
        let out = gather_rows(xs.as_tensor(), &gather).unwrap();
        let expected = [[6f32, 7., 8.], [0., 0., 0.], [0., 1., 2.], [9., 10., 11.]];
        assert_eq!(out.to_vec2::<f32>().unwrap(), expected);
        // The fallback of other devices (index_select past a zero row) computes the same.
        let with_zero =
            Tensor::cat(&[xs.as_tensor(), &Tensor::zeros((1, 3), DType::F32, &device).unwrap()], 0).unwrap();
        let fallback = with_zero.index_select(&gather.on_device, 0).unwrap();
        assert_eq!(fallback.to_vec2::<f32>().unwrap(), expected);
        // d/dxs of sum(out * probe): row 1 of xs is never read, so its gradient is zero.
        let probe = Tensor::arange(1f32, 13.0, &device).unwrap().reshape((4, 3)).unwrap();
        let grads = (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = grads.get(xs.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(grad, [[7f32, 8., 9.], [0., 0., 0.], [1., 2., 3.], [10., 11., 12.]]);
        // Gathering back restores every row that was taken.
        let back = gather_rows(&gather_rows(xs.as_tensor(), &gather).unwrap(), &gather.transposed().unwrap());
        let restored = back.unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(restored, [[0f32, 1., 2.], [0., 0., 0.], [6., 7., 8.], [9., 10., 11.]]);
    }

    #[test]
    fn a_row_read_twice_is_an_error() {
        let err = RowGather::new(&[Some(1), Some(1)], 2, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("read twice"), "{err}");
        assert!(RowGather::new(&[Some(2)], 2, &Device::Cpu).is_err());
    }
}
