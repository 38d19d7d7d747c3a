//! Image resizing that gives, for 8-bit RGB images, the same bytes as Pillow's `Image.resize`
//! (which the reference image processors of transformers and mlx-vlm call): Pillow's
//! convolution resampling (`libImaging/Resample.c`) with its filters, coefficient rounding
//! and two passes (horizontal first, then vertical, each rounded and clipped to 8 bits).
//!
//! Why not the `image` crate: its filters, supports and rounding differ, so pixel values
//! would differ from the reference by a level or more (0.008 after normalisation), far above
//! the 1e-4 the vision fixtures are checked to.

use crate::backend::Image;

/// A resampling filter, as Pillow names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filter {
    /// `Image.BILINEAR` (2): triangle, support 1.
    Bilinear,
    /// `Image.BICUBIC` (3): Keys cubic with a = -0.5, support 2.
    Bicubic,
    /// `Image.LANCZOS` (1): sinc windowed by sinc, a = 3, support 3.
    Lanczos,
}

impl Filter {
    /// The filter of a transformers `resample` value (PIL's enum numbers), `None` for filters
    /// not implemented here (NEAREST, BOX, HAMMING).
    pub fn from_pil(v: i64) -> Option<Filter> {
        match v {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index, the number of taps, and the fixed-point taps.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole input (box 0..in).
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; negative values are clamped to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `src` (`w` x `h` RGB) resized horizontally to `out_w`, rows `rows` only.
fn horizontal(src: &[u8], w: usize, rows: std::ops::Range<usize>, out_w: usize, filter: Filter) -> Vec<u8> {
    let c = coeffs(w, out_w, filter);
    let mut out = Vec::with_capacity(rows.len() * out_w * 3);
    for y in rows {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.kk[xx * c.ksize..xx * c.ksize + n];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for ch in 0..3 {
                    ss[ch] = ss[ch].wrapping_add(p[ch] as i32 * kx);
                }
            }
            out.extend(ss.map(clip8));
        }
    }
    out
}

/// `src` (`w` x `h` RGB) resized vertically to `out_h`, its row 0 being source row `first`.
fn vertical(src: &[u8], w: usize, out_h: usize, c: &Coeffs, first: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(out_h * w * 3);
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.kk[yy * c.ksize..yy * c.ksize + n];
        for xx in 0..w {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &ky) in k.iter().enumerate() {
                let at = ((ymin - first + y) * w + xx) * 3;
                for ch in 0..3 {
                    ss[ch] = ss[ch].wrapping_add(src[at + ch] as i32 * ky);
                }
            }
            out.extend(ss.map(clip8));
        }
    }
    out
}

/// `img` resized to `out_w` x `out_h` (both at least 1) exactly as Pillow's
/// `Image.resize((out_w, out_h), filter)` does for an RGB image (Pillow 13.0, the version the
/// fixtures were made with): a copy when the size is unchanged, a pass per axis whose size
/// changes, in Pillow's order.
pub(super) fn resize(img: &Image, out_w: u32, out_h: u32, filter: Filter) -> Image {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (out_w.max(1) as usize, out_h.max(1) as usize);
    if (w, h) == (ow, oh) {
        return img.clone();
    }
    let vc = coeffs(h, oh, filter);
    // Pillow 13: when the height shrinks by more than twice what the width does, the vertical
    // pass runs first (over every column); otherwise the horizontal pass first, over the
    // source rows the vertical pass reads.
    let (dh, dw) = (h as i64 - oh as i64, w as i64 - ow as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let mut data = None::<Vec<u8>>;
    if horizontal_first {
        let first = vc.bounds.first().map_or(0, |b| b.0);
        let last = vc.bounds.last().map_or(h, |b| b.0 + b.1);
        let (mut cur_w, mut base) = (w, 0);
        if ow != w {
            data = Some(horizontal(img.rgb(), w, first..last, ow, filter));
            cur_w = ow;
            base = first;
        }
        if oh != h {
            let src = data.as_deref().unwrap_or(img.rgb());
            data = Some(vertical(src, cur_w, oh, &vc, base));
        }
    } else {
        let v = vertical(img.rgb(), w, oh, &vc, 0);
        data = Some(if ow != w { horizontal(&v, w, 0..oh, ow, filter) } else { v });
    }
    let rgb = data.unwrap_or_else(|| img.rgb().to_vec());
    Image::new(ow as u32, oh as u32, rgb).expect("resize keeps the buffer exact")
}

/// The `w` x `h` region of `img` at (`x`, `y`), which must lie inside it.
pub(super) fn crop(img: &Image, x: u32, y: u32, w: u32, h: u32) -> Image {
    let iw = img.width() as usize;
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for row in y as usize..(y + h) as usize {
        let start = (row * iw + x as usize) * 3;
        out.extend_from_slice(&img.rgb()[start..start + w as usize * 3]);
    }
    Image::new(w, h, out).expect("crop inside the image")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Image {
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                v.extend([
                    (x * 255 / w.max(1)) as u8,
                    (y * 255 / h.max(1)) as u8,
                    ((x * 7 + y * 3) % 256) as u8,
                ]);
            }
        }
        Image::new(w, h, v).unwrap()
    }

    #[test]
    fn a_constant_image_stays_constant_at_any_size() {
        let img = Image::new(7, 5, [10u8, 200, 77].repeat(35)).unwrap();
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (w, h) in [(3, 2), (20, 11), (7, 13), (1, 1)] {
                let r = resize(&img, w, h, f);
                assert_eq!((r.width(), r.height()), (w, h));
                assert!(r.rgb().chunks(3).all(|p| p == [10, 200, 77]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn the_same_size_is_a_copy_and_taps_sum_to_one() {
        let img = gradient(9, 4);
        assert_eq!(resize(&img, 9, 4, Filter::Lanczos), img);
        for (i, o) in [(10, 3), (3, 10), (1000, 37)] {
            let c = coeffs(i, o, Filter::Lanczos);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i64 = c.kk[xx * c.ksize..xx * c.ksize + n].iter().map(|&k| k as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} pixel {xx}: {s}");
            }
        }
    }

    /// The formula of `scripts/make-pil-resize-fixture.py`'s `source()`.
    fn pil_source() -> Image {
        let (w, h) = (37u32, 23u32);
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                v.extend([
                    ((x * 7 + y * 3) % 256) as u8,
                    ((x * x + 5 * y) % 256) as u8,
                    ((255 + 256 * 4 - x * 4 + y * y) % 256) as u8,
                ]);
            }
        }
        Image::new(w, h, v).unwrap()
    }

    /// Byte for byte what Pillow 13.0 gives (tests/fixtures/vlm/pil_resize.json), up- and
    /// downscaling, each filter, one axis or both, in either pass order ((30, 3) and (37, 4)
    /// shrink the height more than twice the width: vertical first).
    #[test]
    fn resize_gives_pillows_bytes() {
        use base64::Engine;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vlm/pil_resize.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let src = pil_source();
        let cases = doc["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 27);
        for c in cases {
            let filter = match c["filter"].as_str().unwrap() {
                "lanczos" => Filter::Lanczos,
                "bicubic" => Filter::Bicubic,
                _ => Filter::Bilinear,
            };
            let (w, h) = (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32);
            let want = base64::engine::general_purpose::STANDARD.decode(c["rgb"].as_str().unwrap()).unwrap();
            let got = resize(&src, w, h, filter);
            let diff = got.rgb().iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{filter:?} {w}x{h}: {diff} bytes differ");
            assert_eq!(got.rgb().len(), want.len());
        }
    }

    #[test]
    fn crop_takes_the_region() {
        let img = gradient(6, 5);
        let c = crop(&img, 2, 1, 3, 2);
        assert_eq!((c.width(), c.height()), (3, 2));
        assert_eq!(&c.rgb()[..3], &img.rgb()[(6 + 2) * 3..(6 + 2) * 3 + 3]);
    }
}
