//! bf16 on the CPU: the element types of the CPU kernels (f32, and bf16 computed in f32) and the
//! cast between f32 and bf16. A CPU without bf16 arithmetic widens bf16 exactly (its bits are the
//! top half of an f32) and rounds results to nearest even, so a kernel written once over
//! [`Element`] serves both dtypes, and bf16 costs what f32 does plus the narrower loads and
//! stores; the bits equal candle's (`half`'s) conversions.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::bf16;

/// An element type of the CPU kernels. Their arithmetic is f32's either way.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The storage's elements, when they are of this type.
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    fn storage(data: Vec<Self>) -> CpuStorage;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    fn slice(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(data) => Some(data),
            _ => None,
        }
    }

    fn storage(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(data)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    /// Round to nearest even, NaN kept quiet with its sign: `half::bf16::from_f32`'s bits,
    /// without its branch, so that a loop of it vectorises.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
        let quiet_nan = ((bits >> 16) as u16) | 0x0040;
        bf16::from_bits(if x.is_nan() { quiet_nan } else { rounded })
    }

    fn slice(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::BF16(data) => Some(data),
            _ => None,
        }
    }

    fn storage(data: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(data)
    }
}

/// The contiguous elements of a CPU custom op's input of type `T`.
pub(crate) fn cpu_slice<'a, T: Element>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let Some(data) = T::slice(storage) else {
        candle_core::bail!("{op}: expected {:?} input, got {:?}", T::DTYPE, storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// `src` converted elementwise, across threads.
pub(crate) fn convert<S: Element, D: Element>(src: &[S]) -> Vec<D> {
    const PIECE: usize = 1 << 14;
    // SAFETY: each piece's elements are written from the source elements beside them.
    unsafe {
        super::written_in_pieces(
            src.len(),
            PIECE,
            #[inline(always)]
            |piece: usize, dst: &mut [std::mem::MaybeUninit<D>]| {
                for (d, &s) in dst.iter_mut().zip(&src[piece * PIECE..]) {
                    d.write(D::from_f32(s.to_f32()));
                }
            },
        )
    }
}

/// Whether the CPU kernels written over [`Element`] take `xs`: f32 or bf16 on the CPU.
pub(crate) fn cpu_kernels_take(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::BF16)
}

/// `xs` in `dtype`, differentiably. Between f32 and bf16 on the CPU, one pass across threads
/// (candle's cast runs on one); otherwise candle's.
pub fn to_dtype(xs: &Tensor, dtype: DType) -> Result<Tensor> {
    let pair = (xs.dtype(), dtype);
    if pair.0 == dtype {
        Ok(xs.clone())
    } else if xs.device().is_cpu() && matches!(pair, (DType::F32, DType::BF16) | (DType::BF16, DType::F32)) {
        xs.contiguous()?.apply_op1(Cast(dtype))
    } else {
        xs.to_dtype(dtype)
    }
}

/// The cast to its dtype; its backward casts the gradient back.
struct Cast(DType);

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "kdmcse-cast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (storage, self.0) {
            (CpuStorage::F32(_), DType::BF16) => {
                bf16::storage(convert::<f32, bf16>(cpu_slice(storage, layout, self.name())?))
            }
            (CpuStorage::BF16(_), DType::F32) => {
                f32::storage(convert::<bf16, f32>(cpu_slice(storage, layout, self.name())?))
            }
            (_, to) => candle_core::bail!("{}: {:?} to {to:?}", self.name(), storage.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(to_dtype(grad_res, arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The rounding equals `half`'s on every bf16 value, the halfway cases between them, values
    /// near overflow, subnormals and NaNs, at every vector level; widening is exact.
    #[test]
    fn conversions_equal_half() {
        let mut cases: Vec<f32> = Vec::new();
        for high in 0..=u16::MAX as u32 {
            // Each bf16 value, the points 1/4, 1/2 (ties) and 3/4 above it, and one ulp off the tie.
            for low in [0u32, 0x4000, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff] {
                cases.push(f32::from_bits((high << 16) | low));
            }
        }
        let theirs: Vec<u16> = cases.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let widened: Vec<u32> = theirs.iter().map(|&b| half::bf16::from_bits(b).to_f32().to_bits()).collect();
        for isa in super::super::Isa::available() {
            super::super::Isa::select(isa);
            let ours = convert::<f32, bf16>(&cases);
            for ((x, ours), theirs) in cases.iter().zip(&ours).zip(&theirs) {
                assert_eq!(ours.to_bits(), *theirs, "{x:e} ({:#010x}), {isa:?}", x.to_bits());
            }
            let back = convert::<bf16, f32>(&ours);
            assert!(back.iter().map(|x| x.to_bits()).eq(widened.iter().copied()), "widening, {isa:?}");
        }
        super::super::Isa::select(super::super::Isa::detected());
    }

    /// Each kernel that takes bf16 gives its f32 result on the widened inputs, rounded once, with
    /// the gradients alike: the products (plain, through transposes, batched with split and merged
    /// heads, the linear layer), the GELU both ways, sums and masked products. The products take
    /// small integers, whose sums are exact in any order: on AMX tiles too, whose order differs.
    #[test]
    fn bf16_kernels_are_their_f32_kernels_rounded() {
        let device = Device::Cpu;
        let randn =
            |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &device).unwrap().to_dtype(DType::BF16).unwrap();
        let ints = |dims: &[usize]| randn(dims).affine(3.0, 0.0).unwrap().round().unwrap();
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let bits = |t: &Tensor| {
            assert_eq!(t.dtype(), DType::BF16);
            t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        };
        let same = |ours: Tensor, f32_result: Tensor, what: &str| {
            let rounded = f32_result.to_dtype(DType::BF16).unwrap();
            assert_eq!(ours.dims(), rounded.dims(), "{what}");
            assert!(
                bits(&ours).iter().zip(bits(&rounded)).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}"
            );
        };
        use super::super::{
            add, gelu_erf, gelu_erf_backward, linear, matmul, matmul_merge_heads, mul_constant,
        };
        let (a, b) = (ints(&[37, 70]), ints(&[70, 29]));
        same(matmul(&a, &b).unwrap(), matmul(&wide(&a), &wide(&b)).unwrap(), "matmul");
        let bt = ints(&[29, 70]);
        let bt_view = bt.t().unwrap();
        same(
            matmul(&a, &bt_view).unwrap(),
            matmul(&wide(&a), &wide(&bt).t().unwrap()).unwrap(),
            "transposed",
        );
        let split = ints(&[2, 5, 3, 8]).transpose(1, 2).unwrap();
        let rhs = ints(&[2, 3, 8, 4]);
        let split_f32 = wide(&split.transpose(1, 2).unwrap()).transpose(1, 2).unwrap();
        same(matmul(&split, &rhs).unwrap(), matmul(&split_f32, &wide(&rhs)).unwrap(), "split heads");
        same(
            matmul_merge_heads(&split, &rhs).unwrap(),
            matmul_merge_heads(&split_f32, &wide(&rhs)).unwrap(),
            "merged heads",
        );
        let (w, bias) = (ints(&[29, 70]), ints(&[29]));
        same(linear(&a, &w, &bias).unwrap(), linear(&wide(&a), &wide(&w), &wide(&bias)).unwrap(), "linear");
        let (x, g) = (randn(&[3, 9000]), randn(&[3, 9000]));
        same(gelu_erf(&x).unwrap(), gelu_erf(&wide(&x)).unwrap(), "gelu");
        same(
            gelu_erf_backward(&x, &g).unwrap(),
            gelu_erf_backward(&wide(&x), &wide(&g)).unwrap(),
            "gelu backward",
        );
        same(add(&x, &g).unwrap(), add(&wide(&x), &wide(&g)).unwrap(), "add");
        same(mul_constant(&x, &g).unwrap(), mul_constant(&wide(&x), &wide(&g)).unwrap(), "masked product");
        // The gradients of a bf16 product reach bf16 operands as the f32 gradients rounded.
        let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
        let probe = ints(&[37, 29]);
        let grads = (matmul(&va, &vb).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        same(
            grads.get(&va).unwrap().clone(),
            matmul(&wide(&probe), &wide(&b).t().unwrap()).unwrap(),
            "lhs gradient",
        );
        same(
            grads.get(&vb).unwrap().clone(),
            matmul(&wide(&a).t().unwrap(), &wide(&probe)).unwrap(),
            "rhs gradient",
        );
    }

    /// The cast equals candle's both ways, and its gradient comes back in the input's dtype.
    #[test]
    fn cast_equals_candle_and_differentiates() {
        let device = Device::Cpu;
        let xs = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (3, 50_001), &device).unwrap())).unwrap();
        let ours = to_dtype(&xs, DType::BF16).unwrap();
        let theirs = xs.to_dtype(DType::BF16).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        let bits =
            |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&ours), bits(&theirs));
        assert_eq!(bits(&to_dtype(&ours, DType::F32).unwrap()), bits(&theirs));
        let probe = Tensor::randn(0f32, 1.0, (3, 50_001), &device).unwrap();
        let loss = (to_dtype(&ours, DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap();
        let grad = loss.backward().unwrap().get(&xs).unwrap().clone();
        assert_eq!(grad.dtype(), DType::F32);
        assert_eq!(bits(&grad), bits(&probe.to_dtype(DType::BF16).unwrap()));
    }
}
