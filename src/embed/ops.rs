//! Element-wise kernels on the model's hot path, on the CPU: GELU (tanh), GELU·up, and the
//! attention softmax with its scale, each done in place, vectorised and spread
//! over the cores. candle's own versions are scalar `tanhf`/`expf` loops (GELU single-threaded)
//! and allocate a fresh buffer per step (page faults on every forward). Other devices and dtypes
//! use candle's ops.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 14;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// e^x to about 2 ulp, branch-free so that loops over it vectorise (Cephes' `expf`
/// polynomial after reducing by powers of two). Below −87 it returns 0, as `expf` underflows.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5·2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2²³ trick (no libm `floor`, which would not vectorise).
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ built from t's bits: n is t's mantissa minus ROUND's. (`n as i32` would be a
    // saturating, NaN-checked scalar conversion per element and keep the loops scalar.)
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// GELU with the tanh approximation, written as x·σ(2u) = x / (1 + e^(−2u)), which is the same
/// function (½(1 + tanh u) = σ(2u)) with one exponential.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// Runs `body` on a slice, compiled for AVX-512 (16 lanes) or else AVX2+FMA (8 lanes) when the
/// CPU has them.
macro_rules! multiversion {
    ($name:ident, |$($arg:ident : $ty:ty),*| $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn widest($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the features were just detected on this CPU (AVX-512F implies
                    // AVX2 and FMA).
                    return unsafe { widest($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected on this CPU.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body
        }
    };
}

multiversion!(gelu_slice, |xs: &mut [f32]| {
    for x in xs.iter_mut() {
        *x = gelu(*x);
    }
});

multiversion!(gelu_mul_slice, |xs: &mut [f32], ys: &[f32]| {
    for (x, y) in xs.iter_mut().zip(ys) {
        *x = gelu(*x) * *y;
    }
});

/// Lanes of the independent accumulators below: without fast-math the compiler does not
/// reorder a float reduction, so a single running max or sum keeps the loop scalar.
const LANES: usize = 16;

multiversion!(softmax_row, |row: &mut [f32], scale: f32| {
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let split = row.len() / LANES * LANES;
    {
        let (body, tail) = row.split_at_mut(split);
        for c in body.chunks_exact_mut(LANES) {
            for i in 0..LANES {
                c[i] *= scale;
                maxes[i] = if c[i] > maxes[i] { c[i] } else { maxes[i] };
            }
        }
        for v in tail.iter_mut() {
            *v *= scale;
            maxes[0] = maxes[0].max(*v);
        }
    }
    let max = maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0f32; LANES];
    let (body, tail) = row.split_at_mut(split);
    for c in body.chunks_exact_mut(LANES) {
        for i in 0..LANES {
            c[i] = exp(c[i] - max);
            sums[i] += c[i];
        }
    }
    for v in tail.iter_mut() {
        *v = exp(*v - max);
        sums[0] += *v;
    }
    let inv = 1.0 / sums.iter().sum::<f32>();
    for v in row.iter_mut() {
        *v *= inv;
    }
});

fn cpu_f32_contiguous(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && t.is_contiguous()
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("in-place op on a non-contiguous tensor".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("in-place op expects f32"),
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("in-place op on a non-contiguous tensor".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("in-place op expects f32"),
    }
}

struct GeluInPlace;

impl candle_core::InplaceOp1 for GeluInPlace {
    fn name(&self) -> &'static str {
        "gelu-tanh-inplace"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        slice_mut(s, l)?.par_chunks_mut(CHUNK).for_each(gelu_slice);
        Ok(())
    }
}

struct GeluMulInPlace;

impl candle_core::InplaceOp2 for GeluMulInPlace {
    fn name(&self) -> &'static str {
        "gelu-tanh-mul-inplace"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let ys = slice(src, src_l)?;
        let xs = slice_mut(dst, dst_l)?;
        if xs.len() != ys.len() {
            candle_core::bail!("gelu·up: {} vs {} elements", xs.len(), ys.len());
        }
        xs.par_chunks_mut(CHUNK)
            .zip(ys.par_chunks(CHUNK))
            .for_each(|(x, y)| gelu_mul_slice(x, y));
        Ok(())
    }
}

struct SoftmaxInPlace {
    scale: f32,
}

impl candle_core::InplaceOp1 for SoftmaxInPlace {
    fn name(&self) -> &'static str {
        "scaled-softmax-inplace"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let cols = *l.dims().last().unwrap_or(&1);
        slice_mut(s, l)?
            .par_chunks_mut(cols.max(1))
            .for_each(|row| softmax_row(row, self.scale));
        Ok(())
    }
}

/// GELU (tanh approximation). Consumes `xs`'s buffer when it can.
pub fn gelu_tanh(xs: Tensor) -> Result<Tensor> {
    if cpu_f32_contiguous(&xs) {
        xs.inplace_op1(&GeluInPlace)?;
        Ok(xs)
    } else {
        xs.gelu()
    }
}

/// GELU(gate) · up, as Gemma's MLP needs. Consumes `gate`'s buffer when it can.
pub fn gelu_mul(gate: Tensor, up: &Tensor) -> Result<Tensor> {
    if cpu_f32_contiguous(&gate) && cpu_f32_contiguous(up) && gate.shape() == up.shape() {
        gate.inplace_op2(up, &GeluMulInPlace)?;
        Ok(gate)
    } else {
        gate.gelu()? * up
    }
}

/// softmax(scores·scale) over the last axis. Consumes `scores`'s buffer when it can.
pub fn scaled_softmax(scores: Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32_contiguous(&scores) {
        scores.inplace_op1(&SoftmaxInPlace {
            scale: scale as f32,
        })?;
        return Ok(scores);
    }
    let s = (scores * scale)?;
    if s.dtype() == DType::F32 {
        candle_nn::ops::softmax_last_dim(&s)
    } else {
        // The reference takes the softmax in f32 for half-precision weights.
        candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(s.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_gelu_match_libm() {
        let mut worst_exp = 0f32;
        let mut worst_gelu = 0f32;
        // Below −87 the result is flushed to 0 (e^−87 ≈ 1.6e−38, under f32's normal range).
        assert!(exp(-87.5) == 0.0 && (-87.5f32).exp() < 1.7e-38);
        let mut x = -86.9f32;
        while x < 80.0 {
            let want = x.exp();
            let rel = if want > 0.0 {
                ((exp(x) - want) / want).abs()
            } else {
                exp(x).abs()
            };
            worst_exp = worst_exp.max(rel);
            x += 0.0137;
        }
        let mut x = -12f32;
        while x < 12.0 {
            let want = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh());
            // Absolute: near −3 the tanh form itself cancels (1 + tanh u ≈ 0) and is the less exact.
            worst_gelu = worst_gelu.max((gelu(x) - want).abs() / x.abs().max(1.0));
            x += 0.00731;
        }
        assert!(worst_exp < 1e-6, "exp relative error {worst_exp}");
        assert!(worst_gelu < 1e-6, "gelu error {worst_gelu}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
    }

    fn max_diff(a: Tensor, b: Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The in-place ops against candle's own on scores of `shape`.
    fn assert_in_place_ops_equal_candle_ops(shape: (usize, usize, usize, usize), scale: f64) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3f32, shape, &dev).unwrap();
        let up = Tensor::randn(0f32, 1f32, shape, &dev).unwrap();
        let want = x.gelu().unwrap();
        let d = max_diff(gelu_tanh(x.copy().unwrap()).unwrap(), want.clone());
        assert!(d < 1e-5, "gelu {d}");
        let d = max_diff(
            gelu_mul(x.copy().unwrap(), &up).unwrap(),
            (&want * &up).unwrap(),
        );
        assert!(d < 1e-5, "gelu·up {d}");
        let want = candle_nn::ops::softmax_last_dim(&(&x * scale).unwrap()).unwrap();
        let d = max_diff(scaled_softmax(x.copy().unwrap(), scale).unwrap(), want);
        assert!(d < 1e-6, "softmax {d}");
    }

    /// Rows shorter than the lanes: only the scalar tails run.
    #[test]
    fn in_place_ops_equal_candle_ops() {
        assert_in_place_ops_equal_candle_ops((2, 3, 5, 7), 0.3);
    }

    /// Rows longer than the lanes, as in the model (1,030 keys: 64 chunks of 16 and a tail),
    /// so the vectorised bodies are what is compared.
    #[test]
    fn in_place_ops_equal_candle_ops_on_long_rows() {
        assert_in_place_ops_equal_candle_ops((2, 3, 4, 1030), 0.125);
    }
}
