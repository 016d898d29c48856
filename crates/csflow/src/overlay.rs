//! Pictures of anomaly maps for people: heatmap overlays, binary masks, mask outlines and PNG encoding.
//!
//! The colour map is Google's Turbo (Anton Mikhailov, 2019, Apache-2.0; the 256-entry table published with
//! it and shipped by matplotlib as `turbo`), kept here as 33 entries sampled at t = k/32 and interpolated
//! linearly: at most 2/255 away from the full table. Turbo runs dark blue (low) through cyan, green and
//! yellow to dark red (high); it reads like the jet map that anomalib and OpenCV users know, without jet's
//! false bands.

use image::{GrayImage, ImageBuffer, PixelWithColorType, Rgb, RgbImage};

use crate::{Error, Result};

/// Turbo sampled at t = k/32, k = 0..=32, as 8-bit sRGB.
const TURBO: [[u8; 3]; 33] = [
    [48, 18, 59],
    [57, 42, 115],
    [64, 64, 161],
    [68, 86, 199],
    [70, 107, 227],
    [70, 127, 246],
    [66, 147, 255],
    [55, 167, 250],
    [41, 187, 236],
    [29, 205, 216],
    [24, 220, 195],
    [30, 232, 176],
    [49, 242, 153],
    [76, 249, 126],
    [107, 253, 100],
    [138, 255, 77],
    [163, 253, 60],
    [184, 247, 53],
    [204, 237, 52],
    [222, 224, 55],
    [237, 208, 58],
    [248, 192, 58],
    [253, 174, 53],
    [254, 152, 44],
    [251, 128, 34],
    [245, 104, 23],
    [236, 82, 15],
    [224, 64, 9],
    [210, 49, 5],
    [192, 35, 2],
    [172, 23, 1],
    [149, 13, 1],
    [122, 4, 3],
];

/// The colour-map colour at `t` in [0, 1] as floating-point sRGB in 0..=255 (clamped; NaN reads as 0).
fn turbo_f32(t: f32) -> [f32; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let p = t * (TURBO.len() - 1) as f32;
    let i = (p.floor() as usize).min(TURBO.len() - 2);
    let f = p - i as f32;
    let (a, b) = (TURBO[i], TURBO[i + 1]);
    [0, 1, 2].map(|c| a[c] as f32 + (b[c] as f32 - a[c] as f32) * f)
}

/// The colour-map (Turbo) colour at `t` in [0, 1], clamped; NaN reads as 0. Also for legends (colour bars).
pub fn turbo(t: f32) -> [u8; 3] {
    turbo_f32(t).map(|v| v.round() as u8)
}

fn check_len(len: usize, height: usize, width: usize) -> Result<()> {
    if height.checked_mul(width) != Some(len) {
        return Err(Error::Invalid(format!("anomaly map has {len} values, the image is {height} x {width} (H x W)")));
    }
    Ok(())
}

/// The anomaly map `map` (row-major, the image's height x width) in colour over `image`.
///
/// Each value is mapped linearly from the range vmin..vmax to 0..1 (clamped: values at or below `vmin` get the
/// first colour, at or above `vmax` the last; NaN counts as `vmin`), coloured with Turbo (see the module
/// doc) and blended: `out = (1 - alpha) * image + alpha * colour`, rounded. `alpha` = 0 leaves the image
/// unchanged, 1 shows the colours alone.
///
/// The caller chooses `vmin` and `vmax` once for a whole set of images, never per image, so that equal
/// colours mean equal anomaly in every picture: e.g. `vmin` = the typical map level of good images (their
/// median) and `vmax` = a high quantile of good images' maps or the pixel threshold. A per-image min-max
/// stretch would paint every good image with a red spot.
pub fn heatmap_overlay(image: &RgbImage, map: &[f32], vmin: f32, vmax: f32, alpha: f32) -> Result<RgbImage> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    check_len(map.len(), h, w)?;
    if !(vmin.is_finite() && vmax.is_finite() && vmax > vmin) {
        return Err(Error::Invalid(format!("heatmap range needs finite vmin < vmax, got [{vmin}, {vmax}]")));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::Invalid(format!("heatmap alpha must lie in [0, 1], got {alpha}")));
    }
    let scale = 1.0 / (vmax - vmin);
    let mut out = image.clone();
    for (px, &v) in out.pixels_mut().zip(map) {
        let colour = turbo_f32((v - vmin) * scale);
        for (p, c) in px.0.iter_mut().zip(colour) {
            *p = ((1.0 - alpha) * *p as f32 + alpha * c).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

/// A binary defect mask of the anomaly map `map` (row-major, `height` x `width`): 255 where the value is at
/// least `threshold` (the same `>=` as the image verdict), 0 elsewhere (NaN included).
pub fn binary_mask(map: &[f32], height: usize, width: usize, threshold: f32) -> Result<GrayImage> {
    check_len(map.len(), height, width)?;
    let (w, h) = (dim(width)?, dim(height)?);
    let pixels = map.iter().map(|&v| if v >= threshold { 255u8 } else { 0 }).collect();
    GrayImage::from_raw(w, h, pixels).ok_or_else(|| Error::Invalid("mask buffer size".into()))
}

fn dim(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Invalid(format!("image side {n} is too large")))
}

/// Draws the outline of `mask` (pixels > 0 are inside, e.g. an MVTec AD ground-truth mask) on `image` in
/// `colour`, 1 px wide: every inside pixel with a 4-neighbour outside the mask or on the image border.
/// The mask must have the image's size. For thumbnails, resize image and mask first so the line stays
/// visible.
pub fn draw_contour(image: &mut RgbImage, mask: &GrayImage, colour: [u8; 3]) -> Result<()> {
    if image.dimensions() != mask.dimensions() {
        return Err(Error::Invalid(format!(
            "mask is {} x {}, the image is {} x {} (W x H)",
            mask.width(),
            mask.height(),
            image.width(),
            image.height()
        )));
    }
    let (w, h) = mask.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && mask.get_pixel(x as u32, y as u32).0[0] > 0
    };
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as i64, y as i64);
            if !inside(xi, yi) {
                continue;
            }
            let edge = !(inside(xi - 1, yi) && inside(xi + 1, yi) && inside(xi, yi - 1) && inside(xi, yi + 1));
            if edge {
                image.put_pixel(x, y, Rgb(colour));
            }
        }
    }
    Ok(())
}

/// PNG bytes of an 8-bit image ([`RgbImage`], [`GrayImage`], RGBA ...).
pub fn encode_png<P, C>(img: &ImageBuffer<P, C>) -> Result<Vec<u8>>
where
    P: PixelWithColorType<Subpixel = u8>,
    C: std::ops::Deref<Target = [u8]>,
{
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(img.as_raw(), img.width(), img.height(), P::COLOR_TYPE)
        .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// JPEG bytes of an RGB image at `quality` (1..=100). For report thumbnails of photos: at quality 90 about
/// a tenth of the PNG's size, and the report takes either.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    if !(1..=100).contains(&quality) {
        return Err(Error::Invalid(format!("JPEG quality must lie in 1..=100, got {quality}")));
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .map_err(|e| Error::Invalid(format!("JPEG encoding failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, v, v]))
    }

    #[test]
    fn vmin_and_vmax_map_to_the_first_and_last_colours() {
        let img = grey(4, 1, 100);
        // Below, at vmin, at vmax, above: clamped to the ends of the colour map.
        let out = heatmap_overlay(&img, &[-5.0, 1.0, 3.0, 99.0], 1.0, 3.0, 1.0).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [48, 18, 59]);
        assert_eq!(out.get_pixel(1, 0).0, [48, 18, 59]);
        assert_eq!(out.get_pixel(2, 0).0, [122, 4, 3]);
        assert_eq!(out.get_pixel(3, 0).0, [122, 4, 3]);
    }

    #[test]
    fn the_middle_is_interpolated_and_blended() {
        let img = grey(2, 1, 100);
        // t = 0.5 is table entry 16 exactly; t = 1/64 lies halfway between entries 0 and 1.
        let out = heatmap_overlay(&img, &[2.0, 1.0 + 2.0 / 64.0], 1.0, 3.0, 1.0).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [163, 253, 60]);
        assert_eq!(out.get_pixel(1, 0).0, [53, 30, 87]); // (48+57)/2 = 52.5 -> 53, (18+42)/2, (59+115)/2
                                                         // alpha 0.25 over grey 100 at t = 1: 0.75 * 100 + 0.25 * [122, 4, 3] = [105.5, 76, 75.75].
        let out = heatmap_overlay(&img, &[3.0, 3.0], 1.0, 3.0, 0.25).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [106, 76, 76]);
    }

    #[test]
    fn alpha_zero_leaves_the_image_unchanged() {
        let mut img = RgbImage::new(3, 2);
        for (i, p) in img.pixels_mut().enumerate() {
            *p = Rgb([i as u8 * 40, 255 - i as u8 * 7, 13]);
        }
        let map = [0.0, 0.3, 0.6, 0.9, 1.2, f32::NAN];
        assert_eq!(heatmap_overlay(&img, &map, 0.0, 1.0, 0.0).unwrap(), img);
    }

    #[test]
    fn nan_counts_as_vmin() {
        let out = heatmap_overlay(&grey(1, 1, 0), &[f32::NAN], 0.0, 1.0, 1.0).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, turbo(0.0));
        assert_eq!(turbo(f32::NAN), [48, 18, 59]);
        assert_eq!(turbo(2.0), [122, 4, 3]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let img = grey(3, 2, 0);
        assert!(heatmap_overlay(&img, &[0.0; 5], 0.0, 1.0, 0.5).is_err());
        assert!(heatmap_overlay(&img, &[0.0; 7], 0.0, 1.0, 0.5).is_err());
        assert!(heatmap_overlay(&img, &[0.0; 6], 1.0, 1.0, 0.5).is_err());
        assert!(heatmap_overlay(&img, &[0.0; 6], 0.0, f32::INFINITY, 0.5).is_err());
        assert!(heatmap_overlay(&img, &[0.0; 6], 0.0, 1.0, 1.5).is_err());
        let msg = heatmap_overlay(&img, &[0.0; 5], 0.0, 1.0, 0.5).unwrap_err().to_string();
        assert!(msg.contains("5 values") && msg.contains("2 x 3"), "{msg}");
        assert!(binary_mask(&[0.0; 5], 2, 3, 0.5).is_err());
    }

    #[test]
    fn binary_mask_marks_values_at_or_above_the_threshold() {
        let m = binary_mask(&[0.1, 0.5, 0.9, f32::NAN, 0.49, 0.5], 2, 3, 0.5).unwrap();
        assert_eq!(m.dimensions(), (3, 2));
        assert_eq!(m.as_raw(), &vec![0, 255, 255, 0, 0, 255]);
    }

    #[test]
    fn contour_outlines_the_mask() {
        // A 3 x 3 square in a 5 x 5 mask: its 8 border pixels are drawn, the centre and outside are not.
        let mut mask = GrayImage::new(5, 5);
        for y in 1..4 {
            for x in 1..4 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let mut img = grey(5, 5, 0);
        draw_contour(&mut img, &mask, [0, 255, 0]).unwrap();
        let drawn: Vec<(u32, u32)> = (0..5)
            .flat_map(|y| (0..5).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[1] == 255)
            .collect();
        assert_eq!(drawn.len(), 8);
        assert!(!drawn.contains(&(2, 2)) && !drawn.contains(&(0, 0)));
        // A mask touching the image border is closed along the border.
        let full = GrayImage::from_pixel(3, 2, image::Luma([1]));
        let mut img = grey(3, 2, 0);
        draw_contour(&mut img, &full, [0, 255, 0]).unwrap();
        assert!(img.pixels().all(|p| p.0 == [0, 255, 0]));
        assert!(draw_contour(&mut grey(4, 4, 0), &full, [0, 255, 0]).is_err());
    }

    #[test]
    fn png_round_trips() {
        let mut img = grey(3, 2, 9);
        img.put_pixel(2, 1, Rgb([1, 2, 3]));
        let bytes = encode_png(&img).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(image::load_from_memory(&bytes).unwrap().to_rgb8(), img);
        let jpeg = encode_jpeg(&grey(8, 8, 128), 90).unwrap();
        assert_eq!(&jpeg[..3], b"\xFF\xD8\xFF");
        let back = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (8, 8));
        assert!(back.pixels().all(|p| p.0.iter().all(|&v| v.abs_diff(128) <= 2)));
        assert!(encode_jpeg(&grey(8, 8, 128), 0).is_err());
        let m = binary_mask(&[0.0, 1.0], 1, 2, 0.5).unwrap();
        assert_eq!(image::load_from_memory(&encode_png(&m).unwrap()).unwrap().to_luma8(), m);
    }
}
