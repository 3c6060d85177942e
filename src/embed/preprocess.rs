//! Image preprocessing shared by extraction and the model: the exact resize the reference does.

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling (`PRECISION_BITS` in its Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resizes to exactly `width`×`height` (aspect ratio not kept, nothing cropped) with bicubic
/// filtering, bit-for-bit what Pillow's `Image.resize(size, Image.BICUBIC)` gives: the resize
/// the reference's image processor does. A port of Pillow's separable convolution (a = −0.5,
/// support widened when shrinking, 22-bit fixed-point coefficients, horizontal pass first,
/// each pass rounded to 8 bits). General-purpose resizers (fast_image_resize included) round
/// differently and were measured up to 4 levels off on a real screenshot.
pub fn resize_for_model(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    resize_pixels(
        Pixels {
            bytes: img.as_raw(),
            width: w,
            height: h,
            stride: w * 3,
            order: ChannelOrder::Rgb,
        },
        width,
        height,
    )
}

/// Byte order of a 3-byte pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    Rgb,
    /// PDFium's native order: swapped while resizing, for free.
    Bgr,
}

/// An image as it lies in someone else's buffer (PDFium's bitmap): 3 bytes a pixel, rows
/// `stride` bytes apart (PDFium pads rows to 4 bytes).
#[derive(Debug, Clone, Copy)]
pub struct Pixels<'a> {
    pub bytes: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub stride: usize,
    pub order: ChannelOrder,
}

/// [`resize_for_model`] straight from a bitmap buffer: no tight RGB copy first. The output is
/// always RGB.
pub fn resize_pixels(src: Pixels<'_>, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (src.width, src.height);
    let (out_w, out_h) = (width as usize, height as usize);
    assert!(
        in_h == 0 || src.bytes.len() >= (in_h - 1) * src.stride + in_w * 3,
        "buffer too small for the image"
    );
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return RgbImage::new(width, height);
    }
    // Per-channel integer sums in whatever order: the same bytes as Pillow's loops. Compiled
    // twice, the AVX2 copy chosen at run time (the default target has SSE2 only, which lacks
    // a 32-bit multiply).
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { resize_avx2(src, out_w, out_h) };
        }
    }
    resize_impl::<false>(src, out_w, out_h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resize_avx2(src: Pixels<'_>, out_w: usize, out_h: usize) -> RgbImage {
    resize_impl::<true>(src, out_w, out_h)
}

/// Lanes per block of the horizontal pass: a multiple of 3 (channels) and of 8 (i32 lanes in
/// an AVX2 register), so channel `c` sits in lanes `c, c+3, ...` of every block.
const BLOCK: usize = 24;

/// `AVX2`: only inside [`resize_avx2`], which runs once the CPU was checked.
#[inline(always)]
fn resize_impl<const AVX2: bool>(src: Pixels<'_>, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (src.width, src.height);
    let horiz = Coeffs::new(in_w, out_w);
    let vert = Coeffs::new(in_h, out_h);
    // Output channel c comes from input byte `from[c]` of a pixel.
    let from = match src.order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    // Horizontal pass over the rows the vertical pass will read.
    let first_row = vert.bounds[0].0;
    let last_row = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
    let rows = last_row - first_row;
    let mut tmp = vec![0u8; rows * out_w * 3];
    // Each output pixel's weights spread over its taps' bytes (weight j at bytes 3j..3j+3),
    // padded with zeros to whole blocks: one multiply-add per byte, vectorised.
    let blocks = (horiz.ksize * 3).div_ceil(BLOCK);
    let span = blocks * BLOCK;
    let mut wide = vec![0i32; out_w * span];
    for (x, &(_, n)) in horiz.bounds.iter().enumerate() {
        for j in 0..n {
            let w = horiz.k[x * horiz.ksize + j];
            wide[x * span + 3 * j..x * span + 3 * j + 3].fill(w);
        }
    }
    for y in 0..rows {
        let row_start = (y + first_row) * src.stride;
        if in_w == out_w {
            // Pillow skips a pass whose size does not change.
            let row = &src.bytes[row_start..row_start + in_w * 3];
            let dst_row = &mut tmp[y * out_w * 3..(y + 1) * out_w * 3];
            for (dst, p) in dst_row.chunks_exact_mut(3).zip(row.chunks_exact(3)) {
                for c in 0..3 {
                    dst[c] = p[from[c]];
                }
            }
            continue;
        }
        // The rest of the buffer from this row on: a block may run past the row's end into
        // the next row, where its weights are zero.
        let rest = &src.bytes[row_start..];
        let dst_row = &mut tmp[y * out_w * 3..(y + 1) * out_w * 3];
        for (x, (dst, &(start, n))) in dst_row.chunks_exact_mut(3).zip(&horiz.bounds).enumerate() {
            let acc = if start * 3 + span <= rest.len() {
                let px = &rest[start * 3..start * 3 + span];
                let wx = &wide[x * span..(x + 1) * span];
                #[cfg(target_arch = "x86_64")]
                if AVX2 {
                    // SAFETY: AVX2 is set only where the CPU has it (see `resize_avx2`); both
                    // slices hold `span`, a whole number of blocks.
                    unsafe { dot_blocks_avx2(px, wx) }
                } else {
                    dot_blocks(px, wx)
                }
                #[cfg(not(target_arch = "x86_64"))]
                dot_blocks(px, wx)
            } else {
                // The last pixels of the last row: taps one by one.
                let k = &horiz.k[x * horiz.ksize..x * horiz.ksize + n];
                let mut acc = [0i32; 3];
                for (p, &w) in rest[start * 3..(start + n) * 3].chunks_exact(3).zip(k) {
                    acc[0] += p[0] as i32 * w;
                    acc[1] += p[1] as i32 * w;
                    acc[2] += p[2] as i32 * w;
                }
                acc
            };
            for c in 0..3 {
                dst[c] = clip8((1i32 << (PRECISION_BITS - 1)) + acc[from[c]]);
            }
        }
    }
    if in_h == out_h {
        return RgbImage::from_raw(out_w as u32, out_h as u32, tmp).expect("sized for the output");
    }
    let (tmp_w, row_offset) = (out_w, first_row);
    // Vertical pass a whole row at a time: the same integer sums as Pillow's per-pixel loop
    // (integer addition does not care about order), but over contiguous bytes, which the
    // compiler vectorises.
    let row_len = out_w * 3;
    let mut out = vec![0u8; out_h * row_len];
    let mut acc = vec![0i32; row_len];
    for (y, &(start, n)) in vert.bounds.iter().enumerate() {
        let k = &vert.k[y * vert.ksize..y * vert.ksize + n];
        let start = start - row_offset;
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (i, &w) in k.iter().enumerate() {
            let src_row = &tmp[(start + i) * tmp_w * 3..(start + i) * tmp_w * 3 + row_len];
            for (a, &p) in acc.iter_mut().zip(src_row) {
                *a += p as i32 * w;
            }
        }
        for (d, &a) in out[y * row_len..(y + 1) * row_len].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("buffer sized for the output")
}

/// Per-channel sums of `px[i] * w[i]` over whole blocks (channel `c` in bytes `c, c+3, ...`).
#[inline(always)]
fn dot_blocks(px: &[u8], wx: &[i32]) -> [i32; 3] {
    let mut lanes = [0i32; BLOCK];
    for (p, w) in px.chunks_exact(BLOCK).zip(wx.chunks_exact(BLOCK)) {
        for i in 0..BLOCK {
            lanes[i] += p[i] as i32 * w[i];
        }
    }
    let mut acc = [0i32; 3];
    for (i, l) in lanes.iter().enumerate() {
        acc[i % 3] += l;
    }
    acc
}

/// [`dot_blocks`] in three 8-lane registers a block. Written out because the compiler turned
/// the plain loop into 2-lane pieces (a block's stride-3 channels defeat its vectoriser); the
/// integer sums, and so the bytes, are the same.
///
/// Safety: the CPU must have AVX2; `px` and `wx` must be as long, a multiple of `BLOCK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_blocks_avx2(px: &[u8], wx: &[i32]) -> [i32; 3] {
    use std::arch::x86_64::*;
    debug_assert!(px.len() == wx.len() && px.len() % BLOCK == 0);
    let mut sums = [_mm256_setzero_si256(); 3];
    for b in 0..px.len() / BLOCK {
        for (r, sum) in sums.iter_mut().enumerate() {
            let at = b * BLOCK + r * 8;
            // 8 bytes widened to 8 i32 lanes, times their 8 weights.
            let p = _mm256_cvtepu8_epi32(_mm_loadl_epi64(px.as_ptr().add(at).cast()));
            let w = _mm256_loadu_si256(wx.as_ptr().add(at).cast());
            *sum = _mm256_add_epi32(*sum, _mm256_mullo_epi32(p, w));
        }
    }
    let mut lanes = [0i32; BLOCK];
    for (r, sum) in sums.iter().enumerate() {
        _mm256_storeu_si256(lanes.as_mut_ptr().add(r * 8).cast(), *sum);
    }
    let mut acc = [0i32; 3];
    for (i, l) in lanes.iter().enumerate() {
        acc[i % 3] += l;
    }
    acc
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input pixel and how many are read, and their fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
    ksize: usize,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).
    fn new(in_size: usize, out_size: usize) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut sum = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(xmax) {
                *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) / filterscale);
                sum += *wx;
            }
            for x in 0..xmax {
                let v = if sum != 0.0 { w[x] / sum } else { w[x] };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            bounds.push((xmin, xmax));
        }
        Coeffs { bounds, k, ksize }
    }
}

/// How pixel bytes become model inputs: ×`rescale`, then (v − mean) / std per channel. The
/// defaults are SigLIP's (1/255, 0.5, 0.5); a checkpoint's `preprocessor_config.json` may say
/// otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization {
            rescale: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

impl Normalization {
    /// Reads `rescale_factor`, `image_mean`, `image_std` (missing keys keep the defaults) and
    /// the square `size` it asks for, if any.
    pub fn from_preprocessor_config(text: &str) -> Result<(Normalization, Option<u32>), String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut n = Normalization::default();
        if v.get("do_rescale").and_then(|x| x.as_bool()) == Some(false) {
            n.rescale = 1.0;
        } else if let Some(r) = v.get("rescale_factor").and_then(|x| x.as_f64()) {
            n.rescale = r as f32;
        }
        let triple = |key: &str| -> Result<Option<[f32; 3]>, String> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Number(x)) => {
                    Ok(Some([x.as_f64().unwrap_or(0.0) as f32; 3]))
                }
                Some(serde_json::Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| format!("`{key}` holds a non-number"))?
                            as f32;
                    }
                    Ok(Some(out))
                }
                Some(other) => Err(format!("`{key}` is {other}; expected three numbers")),
            }
        };
        if v.get("do_normalize").and_then(|x| x.as_bool()) == Some(false) {
            n.mean = [0.0; 3];
            n.std = [1.0; 3];
        } else {
            if let Some(m) = triple("image_mean")? {
                n.mean = m;
            }
            if let Some(s) = triple("image_std")? {
                n.std = s;
            }
        }
        let size = v.get("size").and_then(|s| {
            let h = s.get("height")?.as_u64()?;
            let w = s.get("width")?.as_u64()?;
            (h == w).then_some(h as u32)
        });
        Ok((n, size))
    }
}

/// The model's input for one page with SigLIP's normalisation: see [`pixel_values_with`].
pub fn pixel_values(img: &RgbImage, size: u32) -> Vec<f32> {
    pixel_values_with(img, size, &Normalization::default())
}

/// The model's input for one page: resized to `size`×`size`, rescaled and normalised, as
/// channel-major f32 (C, H, W).
pub fn pixel_values_with(img: &RgbImage, size: u32, norm: &Normalization) -> Vec<f32> {
    let resized = resize_for_model(img, size, size);
    let plane = (size * size) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            // In the order the reference computes it: rescale, then normalise.
            out[c * plane + i] = (px[c] as f32 * norm.rescale - norm.mean[c]) / norm.std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessor_config_values_are_read_and_defaults_kept() {
        let (n, size) = Normalization::from_preprocessor_config(
            r#"{"image_mean": [0.1, 0.2, 0.3], "image_std": 0.25, "size": {"height": 448, "width": 448}}"#,
        )
        .unwrap();
        assert_eq!(n.mean, [0.1, 0.2, 0.3]);
        assert_eq!(n.std, [0.25; 3]);
        assert_eq!(n.rescale, 1.0 / 255.0);
        assert_eq!(size, Some(448));
        let err = Normalization::from_preprocessor_config(r#"{"image_mean": "grey"}"#).unwrap_err();
        assert!(err.contains("image_mean"), "{err}");
    }

    #[test]
    fn the_avx2_resize_gives_the_plain_one_s_bytes() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx2") {
                eprintln!("no AVX2 on this CPU: only the plain resize runs here");
                return;
            }
            // Sharp edges and noise, padded rows (as PDFium's), both byte orders, shrinking
            // and growing, and sizes whose last taps run into the buffer's end.
            for (w, h, ow, oh) in [
                (1275, 1650, 448, 448),
                (97, 61, 448, 448),
                (1240, 1754, 448, 448),
                (33, 900, 7, 448),
            ] {
                let stride = (w * 3usize).div_ceil(4) * 4;
                let bytes: Vec<u8> = (0..stride * h)
                    .map(|i| {
                        ((i as u32).wrapping_mul(2_654_435_761) >> 11) as u8
                            | if i % 7 == 0 { 0xf0 } else { 0 }
                    })
                    .collect();
                for order in [ChannelOrder::Rgb, ChannelOrder::Bgr] {
                    let src = Pixels {
                        bytes: &bytes,
                        width: w,
                        height: h,
                        stride,
                        order,
                    };
                    // SAFETY: AVX2 checked above.
                    let fast = unsafe { resize_avx2(src, ow, oh) };
                    let plain = resize_impl::<false>(src, ow, oh);
                    assert_eq!(
                        fast.as_raw(),
                        plain.as_raw(),
                        "{w}x{h} -> {ow}x{oh}, {order:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn resize_keeps_a_flat_image_flat_and_an_unchanged_size_identical() {
        let flat = RgbImage::from_pixel(37, 91, image::Rgb([200, 17, 99]));
        let out = resize_for_model(&flat, 14, 14);
        assert!(out.pixels().all(|p| p.0 == [200, 17, 99]));
        let same = resize_for_model(&flat, 37, 91);
        assert_eq!(same.as_raw(), flat.as_raw());
    }
}
