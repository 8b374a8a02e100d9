//! `exp` and `sin_cos` in plain f32 arithmetic (Cephes' polynomials), for the CPU kernels: unlike
//! libm's, which are calls, they vectorise with the loops that use them, and they give the same
//! bits at every vector width. `kernels/ops.cu` has the same functions for the GPU twins.

/// `e^x` (Cephes expf: `x = k ln 2 + r`, a polynomial in `r`, `2^k` from the exponent bits;
/// within 2 ulp), 0 below `-87.3`; arithmetic only, so it vectorises.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.336_54, 88.722_83);
    let k = (clamped * LOG2E + ROUND) - ROUND;
    let r = (clamped - k * 0.693_359_4) - k * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    let e = (p * (r * r) + r + 1.0) * scale;
    if x < -87.336_54 {
        0.0
    } else {
        e
    }
}

/// `(sin x, cos x)` for `|x| < 8192` (Cephes sinf and cosf: `x` less a multiple of pi/4, minimax
/// polynomials on [-pi/4, pi/4], the octant choosing polynomial and sign); arithmetic only.
#[inline(always)]
pub(super) fn sin_cos(x: f32) -> (f32, f32) {
    let a = x.abs();
    let j = ((a * std::f32::consts::FRAC_2_PI * 2.0) as i32 + 1) & !1;
    let y = j as f32;
    let z = ((a - y * 0.785_156_25) - y * 2.418_756_5e-4) - y * 3.774_895e-8;
    let zz = z * z;
    let sin_z = ((-1.951_529_6e-4 * zz + 8.332_161e-3) * zz - 1.666_665_5e-1) * zz * z + z;
    let cos_z = ((2.443_315_7e-5 * zz - 1.388_731_6e-3) * zz + 4.166_664_6e-2) * zz * zz - 0.5 * zz + 1.0;
    let (sin, cos) = if j & 2 != 0 { (cos_z, sin_z) } else { (sin_z, cos_z) };
    let sin = if j & 4 != 0 { -sin } else { sin };
    let cos = if (j + 2) & 4 != 0 { -cos } else { cos };
    (if x < 0.0 { -sin } else { sin }, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` and `sin_cos` against f64's, over the ranges the kernels use and
    /// beyond (every octant of sin and cos), and exp's exact points.
    #[test]
    fn exp_and_sin_cos_are_accurate() {
        for k in 0..=20_000 {
            let x = -87.0 + 87.0 * k as f32 / 20_000.0;
            let expected = (x as f64).exp();
            assert!(
                ((exp(x) as f64 - expected) / expected).abs() < 3e-7,
                "exp({x}) = {} vs {expected}",
                exp(x)
            );
            let x = -10.0 + 20.0 * k as f32 / 20_000.0;
            let (sin, cos) = sin_cos(x);
            assert!((sin as f64 - (x as f64).sin()).abs() < 3e-7, "sin({x}) = {sin}");
            assert!((cos as f64 - (x as f64).cos()).abs() < 3e-7, "cos({x}) = {cos}");
        }
        assert_eq!((exp(0.0), exp(-90.0), exp(-99_999.99)), (1.0, 0.0, 0.0));
    }
}
