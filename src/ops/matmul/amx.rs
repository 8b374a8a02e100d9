//! bf16 products on Intel's AMX tiles ([`Isa::Amx`](super::super::Isa)): both operands packed
//! into 1 KiB tiles (the left one 16 rows x 32 bf16, the right one in the pairs-interleaved layout
//! TDPBF16PS reads: row `p` holds columns 0..16 of rows `2p` and `2p + 1`), zero-padded to whole
//! tiles, and each 32 x 32 block of the output accumulated in four f32 tiles over the whole inner
//! dimension. A bf16 x bf16 product is exact in f32 and the sums are f32's, taken in the tiles'
//! order (subnormal bf16 inputs counting as zero, as TDPBF16PS reads them): the results agree
//! with the widened f32 product to rounding, not bit for bit. The bias is added and the sum
//! rounded to bf16 as it leaves the tiles. The instructions are inline assembly: stable Rust has
//! no AMX intrinsics.

use std::arch::asm;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use half::bf16;

use super::super::cast::Element;
use super::{Output, Strided};

/// Rows of a tile, and bf16 per row of a left tile (64 bytes).
const ROWS: usize = 16;
const DEPTH: usize = 32;
/// bf16 per packed tile (1 KiB), as pairs, and f32 per output tile.
const TILE: usize = ROWS * DEPTH;
const PAIRS: usize = TILE / 2;
const OUT_TILE: usize = ROWS * ROWS;
/// Output blocks (of 32 x 32) per parallel task: enough work to repay loading the tile state.
const BLOCKS_PER_TASK: usize = 8;

/// Whether this CPU has AMX's bf16 tiles and Linux lets this process use them (the tile data
/// is state a process asks for once; a kernel without the permission would fault).
pub(in super::super) fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_ulong = 18;
        // SAFETY: arch_prctl with these arguments only asks for a permission.
        edx & (1 << 22) != 0
            && edx & (1 << 24) != 0
            && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    })
}

/// `out = a [m x k] x b [k x n] (+ bias on every row)`, summed in f32 and rounded once to bf16, on
/// every thread or (`parallel` false) on this one.
///
/// # Safety
/// [`usable`] is true; `a` and `b` reach `m x k` and `k x n` readable elements, `out` `m` rows of
/// `n` writable ones no one else touches meanwhile; `bias` has `n`.
pub(super) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    a: Strided<u16>,
    b: Strided<u16>,
    out: Output<u16>,
    bias: Option<&[f32]>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Whole pairs of strips each way, so that every block is 2 x 2 tiles.
    let (row_strips, col_strips, depth_tiles) = (m.div_ceil(32) * 2, n.div_ceil(32) * 2, k.div_ceil(DEPTH));
    // The left operand's lines are its rows, the right one's its columns, both along the depth.
    let left =
        Lines { data: a.data, line_stride: a.row_stride, depth_stride: a.col_stride, lines: m, depth: k };
    let right =
        Lines { data: b.data, line_stride: b.col_stride, depth_stride: b.row_stride, lines: n, depth: k };
    // SAFETY: the lines are the operands the caller vouches for; AMX's CPUs have AVX-512.
    let (lhs, rhs) = unsafe {
        (
            left.packed(row_strips, depth_tiles, false, parallel),
            right.packed(col_strips, depth_tiles, true, parallel),
        )
    };
    let (row_blocks, col_blocks) = (row_strips / 2, col_strips / 2);
    let packed = Packed { lhs: lhs.as_ptr() as *const u16, rhs: rhs.as_ptr() as *const u16, depth_tiles };
    let bias = bias.map(|bias| Bias(bias.as_ptr()));
    // Consecutive tasks take the next row block against the same column blocks, whose packed
    // tiles stay in cache.
    let run = |task: usize| {
        let (row_block, first) = (task % row_blocks, (task / row_blocks) * BLOCKS_PER_TASK);
        let blocks = (first..col_blocks.min(first + BLOCKS_PER_TASK)).map(|col_block| (row_block, col_block));
        // SAFETY: the packed operands hold every tile the blocks read; each task writes its own
        // blocks of `out`; the CPU has AMX and AVX-512.
        unsafe { compute(packed, blocks, (m, n), out, bias) }
    };
    let tasks = row_blocks * col_blocks.div_ceil(BLOCKS_PER_TASK);
    if parallel {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// The packed operands: `depth_tiles` tiles per strip of 16 lines.
#[derive(Clone, Copy)]
struct Packed {
    lhs: *const u16,
    rhs: *const u16,
    depth_tiles: usize,
}

/// A bias row (f32, one per output column).
#[derive(Clone, Copy)]
struct Bias(*const f32);

// SAFETY: the operands, the packed tiles and the bias are only read, while the call that holds
// them runs.
unsafe impl Send for Packed {}
unsafe impl Sync for Packed {}
unsafe impl Send for Bias {}
unsafe impl Sync for Bias {}
unsafe impl Send for Lines {}
unsafe impl Sync for Lines {}

/// An operand as lines along the depth (the inner dimension of the product): element `(line, d)`
/// at `data[line * line_stride + d * depth_stride]`, `lines x depth` of them.
#[derive(Clone, Copy)]
struct Lines {
    data: *const u16,
    line_stride: usize,
    depth_stride: usize,
    lines: usize,
    depth: usize,
}

impl Lines {
    /// The lines in `strips` strips of 16 (zeros past the last line), each strip `depth_tiles`
    /// tiles of 16 x 16 depth pairs (the element at depth `2q` low, `2q + 1` high; zeros past
    /// the depth): row `i` of a tile holds line `i`'s pairs (the left operand's tiles) or, with
    /// `transposed`, row `q` holds the lines' pair `q` (the right one's).
    ///
    /// # Safety
    /// The lines reach readable memory; the CPU has AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn packed(self, strips: usize, depth_tiles: usize, transposed: bool, parallel: bool) -> Vec<u32> {
        let (len, strip) = (strips * depth_tiles * PAIRS, depth_tiles * PAIRS);
        let mut packed = Vec::with_capacity(len);
        // SAFETY: each strip reads its own lines, in bounds by the caller's promise.
        let pack = |(i, tiles): (usize, &mut [MaybeUninit<u32>])| unsafe {
            self.pack_strip(i * ROWS, transposed, tiles)
        };
        if parallel {
            packed.spare_capacity_mut()[..len].par_chunks_mut(strip.max(1)).enumerate().for_each(pack);
        } else {
            packed.spare_capacity_mut()[..len].chunks_mut(strip.max(1)).enumerate().for_each(pack);
        }
        // SAFETY: every strip wrote each of its elements.
        unsafe { packed.set_len(len) };
        packed
    }

    /// Lines `first..first + 16` into `tiles`, reading along whichever stride is 1 where the
    /// tile is whole.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn pack_strip(self, first: usize, transposed: bool, tiles: &mut [MaybeUninit<u32>]) {
        let lines = self.lines.saturating_sub(first).min(ROWS);
        // SAFETY: (first + i, d) is inside the operand for i < lines, d < depth.
        let at = |i: usize, d: usize| -> u32 {
            match i < lines && d < self.depth {
                true => unsafe {
                    *self.data.add((first + i) * self.line_stride + d * self.depth_stride) as u32
                },
                false => 0,
            }
        };
        let slot = |i: usize, q: usize| if transposed { q * ROWS + i } else { i * ROWS + q };
        for (t, tile) in tiles.chunks_exact_mut(PAIRS).enumerate() {
            let d0 = t * DEPTH;
            let whole = lines == ROWS && d0 + DEPTH <= self.depth;
            // SAFETY: only called for whole tiles, whose 16 lines and 32 depths are inside.
            let line =
                |i: usize| unsafe { self.data.add((first + i) * self.line_stride + d0 * self.depth_stride) };
            if whole && self.depth_stride == 1 {
                // Each pair is two adjacent bf16: one (unaligned) u32.
                for i in 0..ROWS {
                    let pairs = line(i) as *const u32;
                    for q in 0..ROWS {
                        tile[slot(i, q)].write(unsafe { pairs.add(q).read_unaligned() });
                    }
                }
            } else if whole && self.line_stride == 1 {
                // The 16 lines at one depth are adjacent: two such rows make 16 pairs.
                for q in 0..ROWS {
                    let even =
                        unsafe { std::slice::from_raw_parts(line(0).add(2 * q * self.depth_stride), ROWS) };
                    let odd = unsafe {
                        std::slice::from_raw_parts(line(0).add((2 * q + 1) * self.depth_stride), ROWS)
                    };
                    for i in 0..ROWS {
                        tile[slot(i, q)].write(even[i] as u32 | (odd[i] as u32) << 16);
                    }
                }
            } else {
                for i in 0..ROWS {
                    for q in 0..ROWS {
                        tile[slot(i, q)].write(at(i, d0 + 2 * q) | at(i, d0 + 2 * q + 1) << 16);
                    }
                }
            }
        }
    }
}

/// The tile shapes: palette 1, tiles 0-7 each 16 rows of 64 bytes (the f32 accumulators 0-3, the
/// left operands 4-5, the right ones 6-7).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const TILE_CONFIG: TileConfig = {
    let mut config = [0u8; 64];
    config[0] = 1;
    let mut tile = 0;
    while tile < 8 {
        config[16 + 2 * tile] = 64;
        config[48 + tile] = ROWS as u8;
        tile += 1;
    }
    TileConfig(config)
};

/// The 32 x 32 output blocks `blocks` (row block, column block) from the packed operands,
/// rounded to bf16 (after adding the bias) into `out` within `rows x cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn compute(
    Packed { lhs, rhs, depth_tiles }: Packed,
    blocks: impl Iterator<Item = (usize, usize)>,
    (rows, cols): (usize, usize),
    out: Output<u16>,
    bias: Option<Bias>,
) {
    let strip = depth_tiles * TILE;
    let mut sums = [[0f32; OUT_TILE]; 4];
    // SAFETY: the configuration is a valid palette-1 one; the loads read whole packed tiles (64
    // bytes a row, rows 64 bytes apart) inside the buffers; the stores write the 4 KiB of `sums`;
    // the rows written are inside `out`, the bias read inside its `cols`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr());
        for (row_block, col_block) in blocks {
            let (a0, b0) = (lhs.add(2 * row_block * strip), rhs.add(2 * col_block * strip));
            let (a1, b1) = (a0.add(strip), b0.add(strip));
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3");
            for d in 0..depth_tiles {
                let offset = d * TILE;
                asm!(
                    "tileloadd tmm4, [{a0} + {stride} * 1]",
                    "tileloadd tmm5, [{a1} + {stride} * 1]",
                    "tileloadd tmm6, [{b0} + {stride} * 1]",
                    "tileloadd tmm7, [{b1} + {stride} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(offset),
                    a1 = in(reg) a1.add(offset),
                    b0 = in(reg) b0.add(offset),
                    b1 = in(reg) b1.add(offset),
                    stride = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{s0} + {stride} * 1], tmm0",
                "tilestored [{s1} + {stride} * 1], tmm1",
                "tilestored [{s2} + {stride} * 1], tmm2",
                "tilestored [{s3} + {stride} * 1], tmm3",
                s0 = in(reg) sums[0].as_mut_ptr(),
                s1 = in(reg) sums[1].as_mut_ptr(),
                s2 = in(reg) sums[2].as_mut_ptr(),
                s3 = in(reg) sums[3].as_mut_ptr(),
                stride = in(reg) 64usize,
                options(nostack),
            );
            for (tile, sums) in sums.iter().enumerate() {
                let (row0, col0) = (32 * row_block + 16 * (tile / 2), 32 * col_block + 16 * (tile % 2));
                let width = cols.saturating_sub(col0).min(ROWS);
                // A tile of the padding past the last column: nothing to write, and no pointer
                // past the output or the bias to form.
                if width == 0 {
                    continue;
                }
                let bias = bias.map(|Bias(bias)| std::slice::from_raw_parts(bias.add(col0), width));
                for r in 0..rows.saturating_sub(row0).min(ROWS) {
                    let dst = std::slice::from_raw_parts_mut(
                        out.data.add((row0 + r) * out.row_stride + col0),
                        width,
                    );
                    let src = &sums[r * ROWS..r * ROWS + width];
                    let round = |x: f32| <bf16 as Element>::from_f32(x).to_bits();
                    match bias {
                        Some(bias) => {
                            dst.iter_mut().zip(src.iter().zip(bias)).for_each(|(d, (s, b))| *d = round(s + b))
                        }
                        None => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = round(s)),
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}
