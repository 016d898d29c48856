//! Image files to the network's input pyramid (SPEC 1.1): decode, resize exactly as PIL's antialiased
//! bilinear, normalise with ImageNet statistics, then halve with nearest sampling per scale.

use std::path::Path;

use candle_core::{Device, Tensor};
use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use crate::{Error, Result};

/// Largest side csflow decodes; checked from the header, before any pixel buffer is allocated.
pub const MAX_SIDE: u32 = 20_000;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decodes PNG, JPEG, BMP, TIFF or WebP into 8-bit RGB. Gray is replicated and alpha dropped (as PIL's
/// `convert("RGB")`); 16-bit samples are scaled to 8 bits (v / 257, rounded) where PIL would clip them at
/// 255, which turns most 16-bit photos white.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bad = |m: String| Error::format(path, m);
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(3 * MAX_SIDE as u64 * MAX_SIDE as u64);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(bad("not an image csflow can read (PNG, JPEG, BMP, TIFF, WebP)".into()));
    }
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => bad(format!("image too large (at most {MAX_SIDE} pixels a side)")),
        e => bad(format!("cannot decode image ({e})")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(bad("empty image".into()));
    }
    Ok(img.to_rgb8())
}

/// Resizes like PIL's `Image.resize((w, h), Image.BILINEAR)`: a triangle filter whose support widens
/// with the downscale factor (antialiasing), on 8-bit samples.
pub fn resize_rgb(img: &RgbImage, height: usize, width: usize) -> Result<RgbImage> {
    if (img.height() as usize, img.width() as usize) == (height, width) {
        return Ok(img.clone());
    }
    let src = Image::from_vec_u8(img.width(), img.height(), img.as_raw().clone(), PixelType::U8x3)
        .map_err(|e| Error::Invalid(format!("resize: {e}")))?;
    let mut dst = Image::new(width as u32, height as u32, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).map_err(|e| Error::Invalid(format!("resize: {e}")))?;
    RgbImage::from_raw(width as u32, height as u32, dst.into_vec()).ok_or_else(|| Error::Invalid("resize: buffer size".into()))
}

/// [1, 3, H, W] f32: samples / 255, minus the ImageNet mean, over the ImageNet std (torchvision's
/// `ToTensor` then `Normalize`, in f32).
pub fn to_normalized_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
}

/// The scales of the input: scale s is `x` at (H / 2^s, W / 2^s) by nearest sampling (PyTorch's
/// `F.interpolate` default: source index floor(dst * in / out)).
pub fn pyramid(x: &Tensor, n_scales: usize) -> Result<Vec<Tensor>> {
    let (_, _, h, w) = x.dims4()?;
    (0..n_scales)
        .map(|s| {
            let (oh, ow) = (h >> s, w >> s);
            if s == 0 {
                return Ok(x.clone());
            }
            let idx = |n: usize, o: usize| Tensor::from_vec((0..o).map(|i| (i * n / o) as u32).collect::<Vec<_>>(), o, x.device());
            Ok(x.index_select(&idx(h, oh)?, 2)?.index_select(&idx(w, ow)?, 3)?)
        })
        .collect()
}

/// Decode, resize to (height, width), normalise, build the pyramid. Returns it with the original
/// (height, width), which anomaly maps are shown at.
pub fn preprocess(path: &Path, height: usize, width: usize, n_scales: usize) -> Result<(Vec<Tensor>, (usize, usize))> {
    let img = load_rgb(path)?;
    let orig = (img.height() as usize, img.width() as usize);
    let x = to_normalized_tensor(&resize_rgb(&img, height, width)?)?;
    Ok((pyramid(&x, n_scales)?, orig))
}
