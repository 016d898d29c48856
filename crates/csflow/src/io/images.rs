//! Image files to the network's input pyramid (SPEC 1.1), computing what the authors' PyTorch pipeline
//! computes: `Image.open(p).convert("RGB")`, torchvision's `Resize((H, W))` on the PIL image (PIL's
//! antialiased bilinear), `ToTensor`, `Normalize(ImageNet mean, std)`, then for scale s
//! `F.interpolate(x, size=(H / 2^s, W / 2^s))` (nearest).
//!
//! Parity with PIL and PyTorch is tested in `tests/images.rs` against `reference/make_image_fixtures.py`.
//!
//! Deliberate differences from PIL:
//! - 16-bit gray (PNG, TIFF): PIL opens it as mode `I;16` and `convert("RGB")` clips every value above 255 to
//!   255, which turns almost any real 16-bit photo white. csflow keeps the high byte (`v >> 8`), which is
//!   what PIL itself does for 16-bit RGB, RGBA and gray+alpha, so all 16-bit inputs are treated alike.
//! - Images larger than [`MAX_PIXELS`] are refused from the header, before any pixel buffer is allocated
//!   (PIL refuses above about 179 million pixels with its decompression-bomb check).
//! - JPEG goes through zune-jpeg, not PIL's libjpeg-turbo: the JPEG standard leaves IDCT rounding and
//!   chroma upsampling to the decoder, and pixels differ by up to 3 grey levels (mean below 0.4 for 4:2:0
//!   chroma; see the tests). Every other format, lossy WebP included, decodes to PIL's exact bytes.
//!
//! The resize is bit-exact with PIL (a port of Pillow's fixed-point code), and normalisation and the pyramid
//! are bit-exact with torchvision and PyTorch in f32.

use std::io::{BufRead, Cursor, Seek};
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// The most pixels (width x height) csflow decodes: 2^28, e.g. 16384 x 16384. Checked from the header,
/// before allocating, so a small file that declares a huge image cannot exhaust memory.
pub const MAX_PIXELS: u64 = 1 << 28;

/// torchvision's ImageNet normalisation (the backbones were trained with it).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The formats csflow reads, for error messages.
const FORMATS: &str = "PNG, JPEG, BMP, TIFF and WebP";

/// Decodes an image file (PNG, JPEG, BMP, TIFF, WebP; gray, gray+alpha, palette, RGB, RGBA, 8 or 16 bits)
/// into 8-bit RGB as PIL's `Image.open(path).convert("RGB")` does: gray is replicated, alpha is dropped (not
/// composited onto a background), palettes are expanded, 16-bit samples keep their high byte (see the
/// module documentation for 16-bit gray). The format is taken from the file's content, the extension only
/// when the content says nothing. EXIF orientation and ICC profiles are ignored, as PIL's `open` does.
///
/// Errors name the file: it cannot be read, it is empty, its format is not supported, it is corrupt, or it
/// is larger than [`MAX_PIXELS`]. File content never makes this panic.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::format(path, "is a folder, not an image file"));
    }
    if meta.len() == 0 {
        return Err(Error::format(path, "empty file, not an image"));
    }
    let reader = ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    decode(reader, path, MAX_PIXELS)
}

/// [`load_rgb`] for an image held in memory (an upload, an archive member); `name` is used in errors.
pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    decode_rgb_within(bytes, name, MAX_PIXELS)
}

/// [`decode_rgb`] for images of at most `max_pixels` (at most [`MAX_PIXELS`]), refused from the header: a
/// server's bound on what one upload may cost (a 16384 x 16384 PNG of zeros compresses to under 1 MB).
pub fn decode_rgb_within(bytes: &[u8], name: &Path, max_pixels: u64) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::format(name, "empty file, not an image"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes));
    if let Some(f) = name.extension().and_then(ImageFormat::from_extension) {
        reader.set_format(f);
    }
    decode(reader, name, max_pixels.min(MAX_PIXELS))
}

fn decode<R: BufRead + Seek>(reader: ImageReader<R>, path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let mut reader = reader.with_guessed_format().map_err(|e| Error::io(path, e))?;
    let format = reader.format();
    let mut limits = image::Limits::default();
    // The decoders' own allocation limit: the largest decoded buffer (16-bit RGBA) of max_pixels pixels.
    limits.max_alloc = Some(max_pixels * 8);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| image_error(path, format, e, max_pixels))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::format(path, format!("image has no pixels ({w} x {h})")));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(too_large(path, Some((w, h)), max_pixels));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(path, format, e, max_pixels))?;
    to_rgb8_like_pil(img).ok_or_else(|| Error::format(path, "the decoder returned a pixel buffer of the wrong size"))
}

fn too_large(path: &Path, dims: Option<(u32, u32)>, max_pixels: u64) -> Error {
    let size = dims.map(|(w, h)| format!(" ({w} x {h} pixels)")).unwrap_or_default();
    let side = (max_pixels as f64).sqrt().floor();
    Error::format(
        path,
        format!("image is too large{size}: at most {max_pixels} pixels are read (e.g. {side} x {side})"),
    )
}

fn image_error(path: &Path, format: Option<ImageFormat>, e: ImageError, max_pixels: u64) -> Error {
    let name = match format {
        Some(ImageFormat::Png) => "PNG",
        Some(ImageFormat::Jpeg) => "JPEG",
        Some(ImageFormat::Bmp) => "BMP",
        Some(ImageFormat::Tiff) => "TIFF",
        Some(ImageFormat::WebP) => "WebP",
        _ => "",
    };
    match e {
        ImageError::Limits(_) => too_large(path, None, max_pixels),
        ImageError::Unsupported(u) if name.is_empty() => {
            Error::format(path, format!("not an image csflow can read ({u}); csflow reads {FORMATS}"))
        }
        ImageError::Unsupported(u) => Error::format(path, format!("unsupported {name} variant: {u}")),
        ImageError::IoError(io) => Error::format(path, format!("cannot decode {name} image: {io}")),
        e => Error::format(path, format!("cannot decode {name} image: {e}")),
    }
}

/// PIL's `convert("RGB")` of what the decoder produced (see the module documentation for 16 bits).
fn to_rgb8_like_pil(img: DynamicImage) -> Option<RgbImage> {
    let (w, h) = (img.width(), img.height());
    // Samples of `channels` per pixel -> RGB: 1 or 2 channels (gray, gray+alpha) replicate the first;
    // 3 or 4 (RGB, RGBA) keep the first three.
    fn rgb<T: Copy>(raw: &[T], channels: usize, to8: impl Fn(T) -> u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(raw.len() / channels * 3);
        for px in raw.chunks_exact(channels) {
            if channels < 3 {
                let v = to8(px[0]);
                out.extend_from_slice(&[v, v, v]);
            } else {
                out.extend_from_slice(&[to8(px[0]), to8(px[1]), to8(px[2])]);
            }
        }
        out
    }
    let hi = |v: u16| (v >> 8) as u8;
    let raw = match img {
        DynamicImage::ImageRgb8(i) => return Some(i),
        DynamicImage::ImageLuma8(i) => rgb(i.as_raw(), 1, |v| v),
        DynamicImage::ImageLumaA8(i) => rgb(i.as_raw(), 2, |v| v),
        DynamicImage::ImageRgba8(i) => rgb(i.as_raw(), 4, |v| v),
        DynamicImage::ImageLuma16(i) => rgb(i.as_raw(), 1, hi),
        DynamicImage::ImageLumaA16(i) => rgb(i.as_raw(), 2, hi),
        DynamicImage::ImageRgb16(i) => rgb(i.as_raw(), 3, hi),
        DynamicImage::ImageRgba16(i) => rgb(i.as_raw(), 4, hi),
        // Floating-point TIFFs: the image crate's convention (0..1 scaled to 0..255, clamped, rounded).
        other => return Some(other.to_rgb8()),
    };
    RgbImage::from_raw(w, h, raw)
}

/// Resizes to `height` x `width` exactly as PIL's `img.resize((width, height), Image.BILINEAR)`, which is
/// what torchvision's `Resize` does on a PIL image: a separable triangle filter whose support grows with
/// the shrink factor (so shrinking averages, i.e. antialiases, instead of skipping pixels).
///
/// This is a port of Pillow's `Resample.c` (8-bit path), bit for bit: coefficients in f64, normalised,
/// then rounded to 22-bit fixed point; the horizontal pass first, rounded and clipped to 8 bits; then the
/// vertical pass. fast_image_resize's `Convolution(Bilinear)` was measured against PIL and is not exact (it
/// runs the vertical pass first and uses 16-bit coefficients: about 20 % of the samples off by one), which
/// moves the normalised input by 1 / (255 * std), about 0.017, and breaks parity with the authors' pipeline.
/// The same size returns a copy, as PIL does.
pub fn resize_rgb(img: &RgbImage, height: usize, width: usize) -> Result<RgbImage> {
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    if height == 0 || width == 0 || sw == 0 || sh == 0 {
        return Err(Error::Invalid(format!("cannot resize a {sh}x{sw} image to {height}x{width} (height x width)")));
    }
    if height as u64 * width as u64 > MAX_PIXELS {
        return Err(Error::Invalid(format!("resize target {height}x{width} is larger than {MAX_PIXELS} pixels")));
    }
    let need_horizontal = width != sw;
    let need_vertical = height != sh;
    let vert = PilCoeffs::bilinear(sh, height);
    let (mut src, mut src_w) = (&img.as_raw()[..sh * sw * 3], sw);
    let temp;
    let mut vert_offset = 0;
    if need_horizontal {
        // Only the source rows the vertical pass reads, as Pillow.
        let first = vert.bounds[0].0;
        let last = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
        let horiz = PilCoeffs::bilinear(sw, width);
        temp = resample_horizontal(&src[first * sw * 3..last * sw * 3], sw, width, &horiz);
        src = &temp;
        src_w = width;
        vert_offset = first;
    }
    let out = if need_vertical { resample_vertical(src, src_w, height, vert_offset, &vert) } else { src.to_vec() };
    RgbImage::from_raw(width as u32, height as u32, out)
        .ok_or_else(|| Error::Invalid(format!("resize to {height}x{width}: output buffer size")))
}

/// Pillow's fixed-point precision for 8-bit images (`PRECISION_BITS`, 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// One axis of Pillow's resampling: for each output index, the first source index and the number of
/// taps, and `ksize` fixed-point weights per output index (`precompute_coeffs` + `normalize_coeffs_8bpc`).
struct PilCoeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

impl PilCoeffs {
    fn bilinear(in_size: usize, out_size: usize) -> Self {
        let filter = |x: f64| {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        };
        let support_1 = 1.0; // the bilinear filter's support
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = support_1 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = 0.0 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) conversion truncates toward zero, as Rust's `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(xmax) {
                *wx = filter(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *wx;
            }
            for (x, wx) in w.iter().enumerate().take(xmax) {
                let v = if ww != 0.0 { wx / ww } else { *wx };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
            }
            bounds.push((xmin, xmax));
        }
        Self { ksize, bounds, k }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.k[i * self.ksize..i * self.ksize + n])
    }
}

/// Pillow's `clip8`: drop the fraction bits, clamp to 0..=255.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over every row of `src` (RGB, `src_w` wide) to `out_w` wide.
fn resample_horizontal(src: &[u8], src_w: usize, out_w: usize, c: &PilCoeffs) -> Vec<u8> {
    use rayon::prelude::*;
    let rows = src.len() / (src_w * 3);
    let mut out = vec![0u8; rows * out_w * 3];
    out.par_chunks_mut(out_w * 3).zip(src.par_chunks(src_w * 3)).for_each(|(dst, row)| {
        for (xx, px) in dst.chunks_exact_mut(3).enumerate() {
            let (start, k) = c.taps(xx);
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(start + x) * 3..(start + x) * 3 + 3];
                // Wrapping like Pillow's C ints; no overflow for images within MAX_PIXELS in practice.
                ss[0] = ss[0].wrapping_add((p[0] as i32).wrapping_mul(kx));
                ss[1] = ss[1].wrapping_add((p[1] as i32).wrapping_mul(kx));
                ss[2] = ss[2].wrapping_add((p[2] as i32).wrapping_mul(kx));
            }
            px.copy_from_slice(&[clip8(ss[0]), clip8(ss[1]), clip8(ss[2])]);
        }
    });
    out
}

/// Vertical pass: `src` holds rows `offset..` of the image (RGB, `w` wide); `out_h` rows out.
fn resample_vertical(src: &[u8], w: usize, out_h: usize, offset: usize, c: &PilCoeffs) -> Vec<u8> {
    use rayon::prelude::*;
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    out.par_chunks_mut(stride).enumerate().for_each(|(yy, dst)| {
        let (start, k) = c.taps(yy);
        let start = start - offset;
        for (i, d) in dst.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss = ss.wrapping_add((src[(start + y) * stride + i] as i32).wrapping_mul(ky));
            }
            *d = clip8(ss);
        }
    });
    out
}

/// [1, 3, H, W] f32 on the CPU: each sample / 255, minus the ImageNet mean, divided by the ImageNet std, in
/// f32 — the same operations as torchvision's `ToTensor` then `Normalize`, so the values are the same bits.
pub fn to_normalized_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = h * w;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw()[..3 * plane].chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (px[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
}

/// The source index PyTorch's nearest interpolation reads for output index `dst` (`nearest_idx` in
/// ATen's UpSample.h, with `size=` given and no scale factor): the f32 scale in / out, floor, clamped.
fn nearest_index(dst: usize, input: usize, output: usize) -> usize {
    if output == input {
        dst
    } else if output == 2 * input {
        dst >> 1
    } else {
        let scale = input as f32 / output as f32;
        ((dst as f32 * scale).floor() as usize).min(input - 1)
    }
}

/// The input scales of CS-Flow: scale s is `x` ([N, C, H, W]) resized to (H / 2^s, W / 2^s), rounded
/// down, by nearest sampling as the authors' `F.interpolate(x, size=...)` (PyTorch's default mode; for
/// exact halving it picks every second row and column, starting with the first). Scale 0 is `x` itself.
/// Applied to the normalised tensor, not to the image file, as the authors do.
pub fn pyramid(x: &Tensor, n_scales: usize) -> Result<Vec<Tensor>> {
    let (_, _, h, w) = x.dims4()?;
    if n_scales == 0 || n_scales > 16 || (h >> (n_scales - 1)) == 0 || (w >> (n_scales - 1)) == 0 {
        return Err(Error::Invalid(format!("cannot make {n_scales} scales of a {h}x{w} input")));
    }
    let index = |input: usize, output: usize| {
        let idx: Vec<u32> = (0..output).map(|d| nearest_index(d, input, output) as u32).collect();
        Tensor::from_vec(idx, output, x.device())
    };
    let mut out = Vec::with_capacity(n_scales);
    out.push(x.clone());
    for s in 1..n_scales {
        let (oh, ow) = (h >> s, w >> s);
        out.push(x.index_select(&index(h, oh)?, 2)?.index_select(&index(w, ow)?, 3)?.contiguous()?);
    }
    Ok(out)
}

/// H and W must be positive multiples of 32 * 2^(n_scales - 1) (128 for 3 scales): the backbone has stride
/// 32 and every coarser scale halves the input, and the flow's cross-scale convolutions need each scale's
/// feature map to be exactly twice the next one. The error says which sizes are allowed (the authors' code
/// crashes with a shape mismatch instead).
pub fn check_input_size(height: usize, width: usize, n_scales: usize) -> Result<()> {
    if n_scales == 0 || n_scales > 8 {
        return Err(Error::Invalid(format!("n_scales must be between 1 and 8, got {n_scales}")));
    }
    let m = 32usize << (n_scales - 1);
    if (height as u64).saturating_mul(width as u64) > MAX_PIXELS {
        return Err(Error::Invalid(format!(
            "input size {height}x{width} (height x width) has more than {MAX_PIXELS} pixels (e.g. 16384 x 16384)"
        )));
    }
    if height > 0 && width > 0 && height.is_multiple_of(m) && width.is_multiple_of(m) {
        return Ok(());
    }
    let near = |v: usize| {
        let lo = v / m * m;
        if lo == 0 {
            format!("{m}")
        } else if lo == v {
            format!("{v}")
        } else {
            format!("{lo} or {}", lo + m)
        }
    };
    Err(Error::Invalid(format!(
        "input size {height}x{width} (height x width) is not allowed with {n_scales} scale{}: height and width must \
         be multiples of {m} (stride 32 at the coarsest scale, 32 * 2^{}); nearest allowed: height {}, width {}",
        if n_scales == 1 { "" } else { "s" },
        n_scales - 1,
        near(height),
        near(width)
    )))
}

/// An image file to the network's input: checks the size ([`check_input_size`]), decodes ([`load_rgb`]),
/// resizes to `height` x `width` ([`resize_rgb`]), normalises ([`to_normalized_tensor`]) and builds
/// `n_scales` scales ([`pyramid`]). Returns the scales ([1, 3, H / 2^s, W / 2^s] f32 on the CPU) and the
/// image's original (height, width), at which anomaly maps are shown.
pub fn preprocess(path: &Path, height: usize, width: usize, n_scales: usize) -> Result<(Vec<Tensor>, (usize, usize))> {
    check_input_size(height, width, n_scales)?;
    let img = load_rgb(path)?;
    let orig = (img.height() as usize, img.width() as usize);
    let x = to_normalized_tensor(&resize_rgb(&img, height, width)?)?;
    Ok((pyramid(&x, n_scales)?, orig))
}
