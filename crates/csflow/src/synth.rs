//! Synthetic defects with pixel masks (SPEC 3, `synth`): from good images only, a labelled data set in the
//! MVTec AD layout, for trying csflow, checking a model and measuring pixel metrics when no real defects exist.
//!
//! Five kinds of defect ([`DefectKind`]), each drawn on a copy of a good image by [`add_defect`]:
//! - `scratch`: one to a few thin straight or curved lines (quadratic Bezier curves), dark or bright,
//!   anti-aliased, 1 to 4 px wide, tapered at the ends, of slightly varying intensity along their length;
//! - `spot`: one to a few small irregular blobs, dark or bright, clustered;
//! - `stain`: one larger irregular region, discoloured (darker or brighter; tinted on colour images) and
//!   semi-transparent, with a soft edge and mottled opacity;
//! - `cut_paste`: a rectangle copied from another place of the same image or from another good image,
//!   possibly rotated (any angle) and mirrored, with a slight brightness and contrast change, pasted with a hard
//!   edge (as in Li et al., "CutPaste", CVPR 2021);
//! - `foreign_texture`: an irregular region filled with a different texture, taken from a donor image (another
//!   kind of surface) or generated (value noise, fibres or stripes), scaled to the local contrast and blended.
//!
//! Every defect is visible: its colour is set from the statistics of the image around it (mean and standard
//! deviation of the luma; at least [`MIN_CONTRAST`] grey levels for lines and blobs), and a draw whose pixels
//! change by less than [`MIN_VISIBLE`] grey levels on average, or whose mask covers less than [`MIN_AREA`] or
//! more than [`MAX_AREA`] of the image, is drawn again (at most [`ATTEMPTS`] times, then the best draw is kept).
//!
//! # The mask
//! A defect is a blend weight w(p) in [0, 1] and a colour t(p) per pixel: out = round(in + w (t - in)). Its mask
//! (255) is the set of pixels where
//! - w >= 0.5, or
//! - w * C > 2, where C is the defect's typical contrast (the mean of max over channels |t - in| where w is at
//!   least half its maximum): the weight is large enough to move a pixel of typical contrast by more than
//!   [`CHANGE_TOLERANCE`] grey levels, or
//! - the pixel actually changed by more than [`CHANGE_TOLERANCE`] grey levels in some channel.
//!
//! Every pixel outside the mask is bit-identical to the input (for the soft-edged kinds the faint fringe where
//! the change would have been at most 2 grey levels is left unchanged), so every pixel that differs from the
//! good image by more than 2 grey levels is in the mask, for every kind. The converse holds on average, not for
//! every pixel: a masked pixel may be unchanged where the surface already had the defect's colour (a dark
//! scratch across a dark grain, a pasted patch that matches what it covers). The mean change over the mask is
//! at least [`MIN_VISIBLE`] grey levels. `cut_paste` has a hard edge (weight 0 or 1); the others are
//! anti-aliased (scratch, spot, foreign_texture: a 1 to 1.5 px edge) or soft (stain).
//!
//! # The data set ([`write_dataset`])
//! The good images (decoded in any format csflow reads; optionally cut into crops first) are split at random:
//! a fraction goes to `train/good`, the rest is held out: written unchanged to `test/good` and used as the bases
//! of the defective images `test/<defect>/NNN.png`, whose masks go to `ground_truth/<defect>/NNN_mask.png`. No
//! training image is the base of a test image. All outputs are PNG (8-bit gray when the image is gray, RGB
//! otherwise; masks 8-bit gray, 0 or 255), named `000.png`, `001.png`, ... per folder as in MVTec AD, and
//! `synth.json` records where each file came from. Each defective image has its own random generator (ChaCha8
//! seeded with the seed, stream = its index), so the output is byte-identical for the same inputs and seed
//! whatever the number of threads.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{GrayImage, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::extract::list_images;
use crate::io::{atomic_write, load_rgb};
use crate::{Error, Result};

/// The smallest mask, as a fraction of the image's pixels.
pub const MIN_AREA: f64 = 0.002;
/// The largest mask, as a fraction of the image's pixels.
pub const MAX_AREA: f64 = 0.15;
/// A pixel changed by more than this many grey levels (in any channel) is in the mask.
pub const CHANGE_TOLERANCE: u8 = 2;
/// The least mean change (grey levels, largest over channels) over a defect's mask.
pub const MIN_VISIBLE: f32 = 10.0;
/// The least contrast (grey levels) of a scratch or a spot against the local mean.
pub const MIN_CONTRAST: f32 = 40.0;
/// How many times a defect is drawn before the best draw is kept.
pub const ATTEMPTS: usize = 24;
/// Images (or crops) smaller than this in either dimension are not used.
pub const MIN_SIDE: u32 = 32;

/// A kind of synthetic defect; [`DefectKind::name`] is its folder name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefectKind {
    Scratch,
    Spot,
    Stain,
    CutPaste,
    ForeignTexture,
}

impl DefectKind {
    pub const ALL: [DefectKind; 5] =
        [DefectKind::Scratch, DefectKind::Spot, DefectKind::Stain, DefectKind::CutPaste, DefectKind::ForeignTexture];

    /// The folder name: `scratch`, `spot`, `stain`, `cut_paste`, `foreign_texture`.
    pub fn name(self) -> &'static str {
        match self {
            DefectKind::Scratch => "scratch",
            DefectKind::Spot => "spot",
            DefectKind::Stain => "stain",
            DefectKind::CutPaste => "cut_paste",
            DefectKind::ForeignTexture => "foreign_texture",
        }
    }
}

impl fmt::Display for DefectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DefectKind {
    type Err = String;

    /// The folder name; `-` may stand for `_` and case is ignored.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        DefectKind::ALL.into_iter().find(|k| k.name() == norm).ok_or_else(|| {
            let names: Vec<&str> = DefectKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown defect type `{s}`: use {}", names.join(", "))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// Drawing one defect
// ---------------------------------------------------------------------------------------------------------

/// Draws one defect of `kind` on a copy of `img` and returns it with its mask (same size; 0 or 255; see the
/// module documentation for which pixels it marks). `donors` are other good images: `cut_paste` copies from
/// `img` itself or one of them; `foreign_texture` takes its texture from one of them (so pass images of a
/// different surface) or, without donors and sometimes with them, generates one. Gray images (all channels
/// equal) stay gray. Pure: the result depends only on the arguments and the state of `rng`.
pub fn add_defect<R: Rng + ?Sized>(
    img: &RgbImage,
    donors: &[RgbImage],
    kind: DefectKind,
    rng: &mut R,
) -> (RgbImage, GrayImage) {
    let gray = is_gray(img);
    let total = (img.width() as f64 * img.height() as f64).max(1.0);
    let mut best: Option<(f64, Composite)> = None;
    for attempt in 0..ATTEMPTS {
        let layer = match kind {
            DefectKind::Scratch => scratch(img, rng),
            DefectKind::Spot => spot(img, rng),
            DefectKind::Stain => stain(img, gray, rng),
            DefectKind::CutPaste => cut_paste(img, donors, gray, attempt, rng),
            DefectKind::ForeignTexture => foreign_texture(img, donors, gray, attempt, rng),
        };
        let c = compose(img, &layer);
        let frac = c.area as f64 / total;
        // How far the draw is from the bounds (0 when it meets them all).
        let miss = (MIN_AREA - frac).max(0.0) / MIN_AREA
            + (frac - MAX_AREA).max(0.0) / MAX_AREA
            + ((MIN_VISIBLE - c.mean_change).max(0.0) / MIN_VISIBLE) as f64;
        if miss == 0.0 {
            return (c.image, c.mask);
        }
        if best.as_ref().is_none_or(|(m, _)| miss < *m) {
            best = Some((miss, c));
        }
    }
    let (_, c) = best.expect("at least one attempt");
    (c.image, c.mask)
}

/// Whether every pixel has equal channels.
pub fn is_gray(img: &RgbImage) -> bool {
    img.pixels().all(|p| p[0] == p[1] && p[1] == p[2])
}

/// A defect before it is applied: blend weight and colour per pixel.
struct Layer {
    width: usize,
    weight: Vec<f32>,
    target: Vec<[f32; 3]>,
}

impl Layer {
    fn new(img: &RgbImage) -> Self {
        let n = img.width() as usize * img.height() as usize;
        Self { width: img.width() as usize, weight: vec![0.0; n], target: vec![[0.0; 3]; n] }
    }

    /// Keeps the stronger of what is there and (w, t).
    fn put(&mut self, x: usize, y: usize, w: f32, t: [f32; 3]) {
        let i = y * self.width + x;
        let w = w.clamp(0.0, 1.0);
        if w > self.weight[i] {
            self.weight[i] = w;
            self.target[i] = t;
        }
    }

    fn area_at_least(&self, w: f32) -> usize {
        self.weight.iter().filter(|&&v| v >= w).count()
    }
}

struct Composite {
    image: RgbImage,
    mask: GrayImage,
    area: usize,
    mean_change: f32,
}

/// Applies a layer and derives the mask (module documentation); pixels outside the mask keep their values.
fn compose(img: &RgbImage, layer: &Layer) -> Composite {
    let (w, h) = img.dimensions();
    let src = img.as_raw();
    let max_w = layer.weight.iter().cloned().fold(0.0f32, f32::max);
    let (mut c_sum, mut c_n) = (0f64, 0usize);
    for (i, (&wt, t)) in layer.weight.iter().zip(&layer.target).enumerate() {
        if wt > 0.0 && wt >= 0.5 * max_w {
            let d = (0..3).map(|c| (t[c] - src[3 * i + c] as f32).abs()).fold(0.0, f32::max);
            c_sum += d as f64;
            c_n += 1;
        }
    }
    let contrast = if c_n > 0 { (c_sum / c_n as f64) as f32 } else { 0.0 };
    let mut out = src.clone();
    let mut mask = vec![0u8; src.len() / 3];
    let (mut area, mut change_sum) = (0usize, 0f64);
    for (i, (&wt, t)) in layer.weight.iter().zip(&layer.target).enumerate() {
        if wt <= 0.0 {
            continue;
        }
        let mut px = [0u8; 3];
        let mut change = 0u8;
        for c in 0..3 {
            let v = src[3 * i + c] as f32;
            px[c] = (v + wt * (t[c] - v)).round().clamp(0.0, 255.0) as u8;
            change = change.max(px[c].abs_diff(src[3 * i + c]));
        }
        if wt >= 0.5 || wt * contrast > CHANGE_TOLERANCE as f32 || change > CHANGE_TOLERANCE {
            out[3 * i..3 * i + 3].copy_from_slice(&px);
            mask[i] = 255;
            area += 1;
            change_sum += change as f64;
        }
    }
    Composite {
        image: RgbImage::from_raw(w, h, out).expect("same size"),
        mask: GrayImage::from_raw(w, h, mask).expect("same size"),
        area,
        mean_change: if area > 0 { (change_sum / area as f64) as f32 } else { 0.0 },
    }
}

/// Mean colour, mean luma and standard deviation of the luma of a window.
#[derive(Clone, Copy, Debug)]
struct Stats {
    mean: [f32; 3],
    luma: f32,
    std: f32,
}

fn luma(p: &[u8]) -> f32 {
    if p[0] == p[1] && p[1] == p[2] {
        p[0] as f32
    } else {
        0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
    }
}

/// Statistics of the window of half-size `radius` (at least 8 px) around (cx, cy), clipped to the image.
fn stats_around(img: &RgbImage, cx: f32, cy: f32, radius: f32) -> Stats {
    let r = radius.max(8.0);
    let (x0, y0, x1, y1) = clip_box(cx - r, cy - r, cx + r, cy + r, img);
    let (mut s, mut l, mut l2, mut n) = ([0f64; 3], 0f64, 0f64, 0f64);
    for y in y0..y1 {
        for x in x0..x1 {
            let p = img.get_pixel(x as u32, y as u32).0;
            for c in 0..3 {
                s[c] += p[c] as f64;
            }
            let v = luma(&p) as f64;
            l += v;
            l2 += v * v;
            n += 1.0;
        }
    }
    if n == 0.0 {
        return Stats { mean: [128.0; 3], luma: 128.0, std: 0.0 };
    }
    let luma = l / n;
    Stats {
        mean: [(s[0] / n) as f32, (s[1] / n) as f32, (s[2] / n) as f32],
        luma: luma as f32,
        std: (l2 / n - luma * luma).max(0.0).sqrt() as f32,
    }
}

/// The pixel range [x0, x1) x [y0, y1) covering the given box, clipped to the image.
fn clip_box(x0: f32, y0: f32, x1: f32, y1: f32, img: &RgbImage) -> (usize, usize, usize, usize) {
    let c = |v: f32, m: u32| (v.max(0.0) as usize).min(m as usize);
    (
        c(x0.floor(), img.width()),
        c(y0.floor(), img.height()),
        c(x1.ceil() + 1.0, img.width()),
        c(y1.ceil() + 1.0, img.height()),
    )
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

fn smoothstep(x: f32) -> f32 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// A signed brightness change of about `magnitude` grey levels from `mean`, dark or bright at random, turned
/// the other way when the chosen side has too little room (a bright defect on a white surface).
fn signed_delta<R: Rng + ?Sized>(rng: &mut R, mean: f32, magnitude: f32) -> f32 {
    let room = |bright: bool| if bright { 255.0 - mean } else { mean };
    let mut bright = rng.random_bool(0.5);
    if room(bright) < 0.8 * magnitude && room(!bright) > room(bright) {
        bright = !bright;
    }
    let m = magnitude.min(room(bright));
    if bright {
        m
    } else {
        -m
    }
}

fn shifted(mean: [f32; 3], delta: f32) -> [f32; 3] {
    mean.map(|c| (c + delta).clamp(0.0, 255.0))
}

/// Deterministic 2-D value noise in [0, 1) (smooth interpolation of hashed lattice values).
#[derive(Clone, Copy)]
struct Noise {
    seed: u32,
}

impl Noise {
    fn new<R: Rng + ?Sized>(rng: &mut R) -> Self {
        Self { seed: rng.random() }
    }

    fn lattice(&self, ix: i32, iy: i32) -> f32 {
        let mut h = (ix as u32).wrapping_mul(0x8da6_b343)
            ^ (iy as u32).wrapping_mul(0xd816_3841)
            ^ self.seed.wrapping_mul(0xcb1a_b31f);
        h ^= h >> 13;
        h = h.wrapping_mul(0x5bd1_e995);
        h ^= h >> 15;
        (h & 0x00ff_ffff) as f32 / 16_777_216.0
    }

    fn value(&self, x: f32, y: f32) -> f32 {
        let (fx, fy) = (x.floor(), y.floor());
        let (sx, sy) = (smoothstep(x - fx), smoothstep(y - fy));
        let (ix, iy) = (fx as i32, fy as i32);
        let a = self.lattice(ix, iy) + sx * (self.lattice(ix + 1, iy) - self.lattice(ix, iy));
        let b = self.lattice(ix, iy + 1) + sx * (self.lattice(ix + 1, iy + 1) - self.lattice(ix, iy + 1));
        a + sy * (b - a)
    }

    /// Fractal sum of `octaves` octaves, normalised to [0, 1).
    fn fbm(&self, x: f32, y: f32, octaves: usize) -> f32 {
        let (mut sum, mut amp, mut norm, mut f) = (0.0, 1.0, 0.0, 1.0);
        for o in 0..octaves {
            let n = Noise { seed: self.seed.wrapping_add(o as u32 * 0x9e37_79b9) };
            sum += amp * n.value(x * f, y * f);
            norm += amp;
            amp *= 0.5;
            f *= 2.0;
        }
        sum / norm
    }
}

/// An irregular closed shape: a circle whose radius varies with the angle (harmonics 2 to 6).
struct Blob {
    cx: f32,
    cy: f32,
    r: f32,
    harmonics: [(f32, f32); 5],
}

impl Blob {
    fn random<R: Rng + ?Sized>(rng: &mut R, cx: f32, cy: f32, r: f32, irregularity: f32) -> Self {
        let mut harmonics = [(0.0, 0.0); 5];
        for (k, h) in harmonics.iter_mut().enumerate() {
            *h = (uniform(rng, 0.0, irregularity) / (k as f32 + 1.0), uniform(rng, 0.0, std::f32::consts::TAU));
        }
        Self { cx, cy, r, harmonics }
    }

    /// The largest radius over all angles.
    fn extent(&self) -> f32 {
        self.r * (1.0 + self.harmonics.iter().map(|h| h.0).sum::<f32>())
    }

    /// (signed distance to the boundary along the ray from the centre, negative inside; that radius).
    fn sd(&self, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let theta = dy.atan2(dx);
        let mut f = 1.0;
        for (k, (a, phi)) in self.harmonics.iter().enumerate() {
            f += a * ((k as f32 + 2.0) * theta + phi).cos();
        }
        let rr = self.r * f.max(0.35);
        ((dx * dx + dy * dy).sqrt() - rr, rr)
    }

    /// Pixels of its bounding box (clipped), with pixel centres.
    fn pixels(&self, img: &RgbImage, margin: f32) -> impl Iterator<Item = (usize, usize, f32, f32)> {
        let e = self.extent() + margin;
        let (x0, y0, x1, y1) = clip_box(self.cx - e, self.cy - e, self.cx + e, self.cy + e, img);
        (y0..y1).flat_map(move |y| (x0..x1).map(move |x| (x, y, x as f32 + 0.5, y as f32 + 0.5)))
    }
}

fn min_side(img: &RgbImage) -> f32 {
    img.width().min(img.height()) as f32
}

fn min_pixels(img: &RgbImage) -> usize {
    (MIN_AREA * img.width() as f64 * img.height() as f64).ceil() as usize
}

/// A quadratic Bezier stroke.
struct Stroke {
    p: [(f32, f32); 3],
    width: f32,
}

impl Stroke {
    /// A random stroke; near another one (roughly parallel, close by) when `near` is given.
    fn random<R: Rng + ?Sized>(rng: &mut R, img: &RgbImage, width: f32, near: Option<&Stroke>) -> Self {
        let (w, h) = (img.width() as f32, img.height() as f32);
        let s = min_side(img);
        let len = s * uniform(rng, 0.25, 0.7);
        let (cx, cy, angle) = match near {
            Some(o) => {
                let (dx, dy) = (o.p[2].0 - o.p[0].0, o.p[2].1 - o.p[0].1);
                let a = dy.atan2(dx) + uniform(rng, -0.25, 0.25);
                let off = s * uniform(rng, 0.02, 0.1) * if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                let (mx, my) = (o.p[1].0, o.p[1].1);
                let along = s * uniform(rng, -0.1, 0.1);
                (mx - a.sin() * off + a.cos() * along, my + a.cos() * off + a.sin() * along, a)
            }
            None => (w * uniform(rng, 0.2, 0.8), h * uniform(rng, 0.2, 0.8), uniform(rng, 0.0, std::f32::consts::PI)),
        };
        let (ux, uy) = (angle.cos(), angle.sin());
        let bend = if rng.random_bool(0.4) { 0.0 } else { len * uniform(rng, -0.2, 0.2) };
        let p0 = (cx - ux * len / 2.0, cy - uy * len / 2.0);
        let p2 = (cx + ux * len / 2.0, cy + uy * len / 2.0);
        // The control point is twice the curve's offset at its middle.
        let p1 = (cx - uy * 2.0 * bend, cy + ux * 2.0 * bend);
        Self { p: [p0, p1, p2], width }
    }

    fn at(&self, t: f32) -> (f32, f32) {
        let [a, b, c] = self.p;
        let u = 1.0 - t;
        (u * u * a.0 + 2.0 * u * t * b.0 + t * t * c.0, u * u * a.1 + 2.0 * u * t * b.1 + t * t * c.1)
    }

    /// Half width at t: full in the middle, tapering to 30 % over the last fifth at each end.
    fn half_width(&self, t: f32) -> f32 {
        0.5 * self.width * (0.3 + 0.7 * smoothstep(t.min(1.0 - t) / 0.2))
    }

    /// Adds the anti-aliased stroke to the layer (coverage of each pixel centre times an intensity that varies
    /// along the stroke).
    fn render(&self, layer: &mut Layer, img: &RgbImage, target: [f32; 3], noise: Noise) {
        let chord = ((self.p[2].0 - self.p[0].0).powi(2) + (self.p[2].1 - self.p[0].1).powi(2)).sqrt();
        let n = ((chord / 2.0).ceil() as usize).clamp(8, 8192);
        let pts: Vec<(f32, f32)> = (0..=n).map(|i| self.at(i as f32 / n as f32)).collect();
        let pad = self.width / 2.0 + 2.0;
        let (mut bx0, mut by0, mut bx1, mut by1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for &(x, y) in &pts {
            (bx0, by0, bx1, by1) = (bx0.min(x), by0.min(y), bx1.max(x), by1.max(y));
        }
        let (x0, y0, x1, y1) = clip_box(bx0 - pad, by0 - pad, bx1 + pad, by1 + pad, img);
        if x1 <= x0 || y1 <= y0 {
            return;
        }
        let bw = x1 - x0;
        // (signed distance to the stroke's edge, position along it) per pixel of the box.
        let mut best = vec![(f32::INFINITY, 0.0f32); bw * (y1 - y0)];
        for i in 0..n {
            let (a, b) = (pts[i], pts[i + 1]);
            let (sx0, sy0, sx1, sy1) =
                clip_box(a.0.min(b.0) - pad, a.1.min(b.1) - pad, a.0.max(b.0) + pad, a.1.max(b.1) + pad, img);
            let (ex, ey) = (b.0 - a.0, b.1 - a.1);
            let len2 = (ex * ex + ey * ey).max(1e-12);
            for y in sy0.max(y0)..sy1.min(y1) {
                for x in sx0.max(x0)..sx1.min(x1) {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    let u = (((px - a.0) * ex + (py - a.1) * ey) / len2).clamp(0.0, 1.0);
                    let d = ((px - a.0 - u * ex).powi(2) + (py - a.1 - u * ey).powi(2)).sqrt();
                    let t = (i as f32 + u) / n as f32;
                    let sd = d - self.half_width(t);
                    let cell = &mut best[(y - y0) * bw + (x - x0)];
                    if sd < cell.0 {
                        *cell = (sd, t);
                    }
                }
            }
        }
        for (j, &(sd, t)) in best.iter().enumerate() {
            let cover = (0.5 - sd).clamp(0.0, 1.0);
            if cover > 0.0 {
                let intensity = 0.75 + 0.25 * noise.value(t * chord / 12.0, 0.5);
                layer.put(x0 + j % bw, y0 + j / bw, cover * intensity, target);
            }
        }
    }
}

fn scratch<R: Rng + ?Sized>(img: &RgbImage, rng: &mut R) -> Layer {
    let mut layer = Layer::new(img);
    let base_width = uniform(rng, 1.0, 4.0);
    let width = |rng: &mut R| (base_width * uniform(rng, 0.75, 1.25)).clamp(1.0, 4.0);
    let w0 = width(rng);
    let mut strokes = vec![Stroke::random(rng, img, w0, None)];
    for _ in 1..rng.random_range(1..=3) {
        let near = if rng.random_bool(0.6) { Some(&strokes[0]) } else { None };
        let wi = width(rng);
        let s = Stroke::random(rng, img, wi, near);
        strokes.push(s);
    }
    // One colour for all strokes, from the statistics around them.
    let (cx, cy) = strokes[0].at(0.5);
    let st = stats_around(img, cx, cy, min_side(img) * 0.3);
    let magnitude = (st.std * uniform(rng, 2.0, 3.5)).clamp(MIN_CONTRAST, 200.0);
    let target = shifted(st.mean, signed_delta(rng, st.luma, magnitude));
    let noise = Noise::new(rng);
    for s in &strokes {
        s.render(&mut layer, img, target, noise);
    }
    // Thin short strokes on a large image may fall short of the smallest mask: add strokes near the first.
    while layer.area_at_least(0.3) < min_pixels(img) * 3 / 2 && strokes.len() < 8 {
        let wi = width(rng);
        let s = Stroke::random(rng, img, wi, Some(&strokes[0]));
        s.render(&mut layer, img, target, noise);
        strokes.push(s);
    }
    layer
}

fn spot<R: Rng + ?Sized>(img: &RgbImage, rng: &mut R) -> Layer {
    let mut layer = Layer::new(img);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let s = min_side(img);
    let (cx, cy) = (w * uniform(rng, 0.1, 0.9), h * uniform(rng, 0.1, 0.9));
    let r0 = (s * uniform(rng, 0.015, 0.045)).max(2.0);
    let st = stats_around(img, cx, cy, s * 0.15);
    let magnitude = (st.std * uniform(rng, 2.0, 3.5)).clamp(MIN_CONTRAST + 5.0, 200.0);
    let delta = signed_delta(rng, st.luma, magnitude);
    let mut blobs = vec![Blob::random(rng, cx, cy, r0, 0.35)];
    let n = rng.random_range(1..=4);
    while blobs.len() < n || (layer_area_of(&blobs, img) < min_pixels(img) * 3 / 2 && blobs.len() < 10) {
        let a = uniform(rng, 0.0, std::f32::consts::TAU);
        let dist = uniform(rng, 2.0 * r0, (s * 0.12).max(3.0 * r0));
        let r = (r0 * uniform(rng, 0.35, 1.0)).max(1.5);
        blobs.push(Blob::random(rng, cx + a.cos() * dist, cy + a.sin() * dist, r, 0.35));
    }
    for b in &blobs {
        // Slightly stronger towards the centre.
        let strength = uniform(rng, 0.85, 1.0);
        for (x, y, px, py) in b.pixels(img, 1.5) {
            let (sd, rr) = b.sd(px, py);
            let cover = (0.5 - sd).clamp(0.0, 1.0);
            if cover > 0.0 {
                let core = (-sd / rr).clamp(0.0, 1.0);
                layer.put(x, y, cover * strength, shifted(st.mean, delta * (0.8 + 0.2 * core)));
            }
        }
    }
    layer
}

/// The approximate area of a set of blobs (sum of their mean-radius discs).
fn layer_area_of(blobs: &[Blob], img: &RgbImage) -> usize {
    let total: f32 = blobs.iter().map(|b| std::f32::consts::PI * b.r * b.r).sum();
    (total as usize).min(img.width() as usize * img.height() as usize)
}

fn stain<R: Rng + ?Sized>(img: &RgbImage, gray: bool, rng: &mut R) -> Layer {
    let mut layer = Layer::new(img);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let s = min_side(img);
    let r = s * uniform(rng, 0.07, 0.16);
    let (cx, cy) = (w * uniform(rng, 0.15, 0.85), h * uniform(rng, 0.15, 0.85));
    let blob = Blob::random(rng, cx, cy, r, 0.45);
    let st = stats_around(img, cx, cy, r * 1.5);
    let magnitude = (st.std * uniform(rng, 2.5, 4.0)).clamp(60.0, 160.0);
    let mut target = shifted(st.mean, signed_delta(rng, st.luma, magnitude));
    if !gray {
        // A tint: rust, oil, water marks are coloured.
        for t in target.iter_mut() {
            *t = (*t + uniform(rng, -40.0, 40.0)).clamp(0.0, 255.0);
        }
    }
    let opacity = uniform(rng, 0.45, 0.8);
    let feather = 0.45 * r;
    let noise = Noise::new(rng);
    let period = (r / 2.0).max(2.0);
    for (x, y, px, py) in blob.pixels(img, 2.0) {
        let (sd, _) = blob.sd(px, py);
        let q = smoothstep((-sd + 0.25 * feather) / feather);
        if q > 0.0 {
            let mottle = 0.65 + 0.35 * noise.fbm(px / period, py / period, 3);
            layer.put(x, y, opacity * q * mottle, target);
        }
    }
    layer
}

/// Luma of a donor pixel for gray bases, the pixel otherwise.
fn sample_rgb(img: &RgbImage, x: i64, y: i64, gray: bool) -> [f32; 3] {
    let x = x.clamp(0, img.width() as i64 - 1) as u32;
    let y = y.clamp(0, img.height() as i64 - 1) as u32;
    let p = img.get_pixel(x, y).0;
    if gray {
        [luma(&p); 3]
    } else {
        p.map(|v| v as f32)
    }
}

fn cut_paste<R: Rng + ?Sized>(img: &RgbImage, donors: &[RgbImage], gray: bool, attempt: usize, rng: &mut R) -> Layer {
    let mut layer = Layer::new(img);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let area = w * h * uniform(rng, 0.01, 0.06);
    let aspect = uniform(rng, 0.3f32.ln(), 3.3f32.ln()).exp();
    let cap = (0.7 * min_side(img)).max(1.0);
    let pw = (area * aspect).sqrt().clamp(3.0f32.min(cap), cap);
    let ph = (area / aspect).sqrt().clamp(3.0f32.min(cap), cap);
    // Rotation: half the time any angle, otherwise a multiple of 90 degrees (exact, no resampling).
    let (cos, sin) = if rng.random_bool(0.5) {
        let a = uniform(rng, 0.0, std::f32::consts::TAU);
        (a.cos(), a.sin())
    } else {
        [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][rng.random_range(0..4)]
    };
    let flip = rng.random_bool(0.5);
    // The source: this image or a donor large enough for the patch.
    let k = rng.random_range(0..=donors.len());
    let src = match k {
        0 => img,
        _ if donors[k - 1].width() as f32 >= pw + 2.0 && donors[k - 1].height() as f32 >= ph + 2.0 => &donors[k - 1],
        _ => img,
    };
    let same = std::ptr::eq(src, img);
    // Destination centre: the rotated patch's bounding box inside the image where possible.
    let (hx, hy) = (0.5 * (pw * cos.abs() + ph * sin.abs()), 0.5 * (pw * sin.abs() + ph * cos.abs()));
    let centre = |rng: &mut R, half: f32, size: f32| {
        if size > 2.0 * half {
            uniform(rng, half, size - half)
        } else {
            size / 2.0
        }
    };
    let (dx, dy) = (centre(rng, hx, w), centre(rng, hy, h));
    let (sw, sh) = (src.width() as f32, src.height() as f32);
    let (mut sx, mut sy) = (centre(rng, pw / 2.0, sw), centre(rng, ph / 2.0, sh));
    // From the same image, not (almost) the same place.
    for _ in 0..16 {
        if !same || ((sx - dx).powi(2) + (sy - dy).powi(2)).sqrt() >= 0.6 * pw.max(ph) {
            break;
        }
        (sx, sy) = (centre(rng, pw / 2.0, sw), centre(rng, ph / 2.0, sh));
    }
    let (x0, y0, x1, y1) = clip_box(dx - hx, dy - hy, dx + hx, dy + hy, img);
    let mut patch = Vec::new();
    for y in y0..y1 {
        for x in x0..x1 {
            let (qx, qy) = (x as f32 + 0.5 - dx, y as f32 + 0.5 - dy);
            // Into the patch's frame (inverse rotation).
            let (lx, ly) = (cos * qx + sin * qy, -sin * qx + cos * qy);
            if lx.abs() <= pw / 2.0 && ly.abs() <= ph / 2.0 {
                let lx = if flip { -lx } else { lx };
                let v = sample_rgb(src, (sx + lx).floor() as i64, (sy + ly).floor() as i64, gray);
                patch.push((x, y, v));
            }
        }
    }
    if patch.is_empty() {
        return layer;
    }
    // A slight brightness and contrast change (CutPaste's colour jitter); a larger shift on later attempts, so
    // that a patch from a flat surface still shows.
    let mut mean = [0f32; 3];
    for (_, _, v) in &patch {
        for c in 0..3 {
            mean[c] += v[c] / patch.len() as f32;
        }
    }
    let st = stats_around(img, dx, dy, pw.max(ph));
    let gain = uniform(rng, 0.85, 1.15);
    let magnitude = (st.std * uniform(rng, 0.15, 0.5)).max(4.0 + 3.0 * attempt as f32);
    let offset = if rng.random_bool(0.5) { magnitude } else { -magnitude };
    for (x, y, v) in patch {
        let t = [0, 1, 2].map(|c| (mean[c] + gain * (v[c] - mean[c]) + offset).clamp(0.0, 255.0));
        layer.put(x, y, 1.0, t);
    }
    layer
}

fn foreign_texture<R: Rng + ?Sized>(
    img: &RgbImage,
    donors: &[RgbImage],
    gray: bool,
    attempt: usize,
    rng: &mut R,
) -> Layer {
    let mut layer = Layer::new(img);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let s = min_side(img);
    let r = s * uniform(rng, 0.07, 0.15);
    let (cx, cy) = (w * uniform(rng, 0.15, 0.85), h * uniform(rng, 0.15, 0.85));
    let blob = Blob::random(rng, cx, cy, r, 0.5);
    let st = stats_around(img, cx, cy, r * 1.5);
    let opacity = uniform(rng, 0.8, 1.0);
    // The texture: a donor's (at a random place and scale) or a generated one.
    let use_donor = !donors.is_empty() && rng.random_ratio(2, 3);
    let donor = if use_donor { Some(&donors[rng.random_range(0..donors.len())]) } else { None };
    let (ox, oy) = (rng.random_range(0..10_000i64), rng.random_range(0..10_000i64));
    let scale = uniform(rng, 0.6, 1.6);
    let noise = Noise::new(rng);
    let style = rng.random_range(0..3);
    let period = uniform(rng, 2.0, 8.0);
    let angle = uniform(rng, 0.0, std::f32::consts::PI);
    let (ca, sa) = (angle.cos(), angle.sin());
    let raw_at = |px: f32, py: f32| -> [f32; 3] {
        if let Some(d) = donor {
            let x = ((px * scale) as i64 + ox).rem_euclid(d.width() as i64);
            let y = ((py * scale) as i64 + oy).rem_euclid(d.height() as i64);
            return sample_rgb(d, x, y, gray);
        }
        let (u, v) = (ca * px + sa * py, -sa * px + ca * py);
        let n = match style {
            // Isotropic grain.
            0 => noise.fbm(u / period, v / period, 3),
            // Fibres: stretched along one direction.
            1 => noise.fbm(u / (period * 6.0), v / period, 3),
            // Stripes with a wobble (a weave, a machining pattern).
            _ => {
                0.5 + 0.5 * (std::f32::consts::TAU * v / (period * 1.5) + 4.0 * noise.fbm(u / 20.0, v / 20.0, 2)).sin()
            }
        };
        [n * 255.0; 3]
    };
    let mut pixels = Vec::new();
    for (x, y, px, py) in blob.pixels(img, 2.0) {
        let (sd, _) = blob.sd(px, py);
        let cover = (0.5 - sd / 1.5).clamp(0.0, 1.0);
        if cover > 0.0 {
            pixels.push((x, y, cover, raw_at(px, py)));
        }
    }
    if pixels.is_empty() {
        return layer;
    }
    let n = pixels.len() as f32;
    let mut mean = [0f32; 3];
    let (mut l, mut l2) = (0f32, 0f32);
    for (_, _, _, v) in &pixels {
        for c in 0..3 {
            mean[c] += v[c] / n;
        }
        let y = 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
        l += y / n;
        l2 += y * y / n;
    }
    let raw_std = (l2 - l * l).max(0.0).sqrt().max(1.0);
    // Contrast like the surface's (at least 12 levels), times 0.8 to 1.5; mean shifted by up to one deviation.
    let base = st.std.max(12.0);
    let gain = base * uniform(rng, 0.8, 1.5) / raw_std;
    let magnitude = base * uniform(rng, 0.2, 1.0) + 2.0 * attempt as f32;
    let offset = signed_delta(rng, st.luma, magnitude);
    for (x, y, cover, v) in pixels {
        let t = [0, 1, 2].map(|c| (st.mean[c] + offset + gain * (v[c] - mean[c])).clamp(0.0, 255.0));
        layer.put(x, y, cover * opacity, t);
    }
    layer
}

// ---------------------------------------------------------------------------------------------------------
// Crops
// ---------------------------------------------------------------------------------------------------------

/// Top-left corners of the non-overlapping `size` x `size` tiles of a `width` x `height` image, row by row,
/// the grid centred (the leftover margin split between both sides). Empty when the image is smaller.
pub fn grid_positions(width: u32, height: u32, size: u32) -> Vec<(u32, u32)> {
    if size == 0 || width < size || height < size {
        return Vec::new();
    }
    let (nx, ny) = (width / size, height / size);
    let (mx, my) = ((width - nx * size) / 2, (height - ny * size) / 2);
    (0..ny).flat_map(|j| (0..nx).map(move |i| (mx + i * size, my + j * size))).collect()
}

/// The non-overlapping `size` x `size` tiles of an image ([`grid_positions`]).
pub fn grid_crops(img: &RgbImage, size: u32) -> Vec<RgbImage> {
    grid_positions(img.width(), img.height(), size)
        .into_iter()
        .map(|(x, y)| image::imageops::crop_imm(img, x, y, size, size).to_image())
        .collect()
}

/// Top-left corners of `count` random `size` x `size` crops (they may overlap). Empty when the image is
/// smaller than the crop.
pub fn random_positions<R: Rng + ?Sized>(
    width: u32,
    height: u32,
    size: u32,
    count: usize,
    rng: &mut R,
) -> Vec<(u32, u32)> {
    if size == 0 || width < size || height < size {
        return Vec::new();
    }
    (0..count).map(|_| (rng.random_range(0..=width - size), rng.random_range(0..=height - size))).collect()
}

/// `count` random `size` x `size` crops of an image ([`random_positions`]); for cutting a data set of small
/// images from a large texture photo.
pub fn random_crops<R: Rng + ?Sized>(img: &RgbImage, size: u32, count: usize, rng: &mut R) -> Vec<RgbImage> {
    random_positions(img.width(), img.height(), size, count, rng)
        .into_iter()
        .map(|(x, y)| image::imageops::crop_imm(img, x, y, size, size).to_image())
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// The data set
// ---------------------------------------------------------------------------------------------------------

/// How to cut good images into crops before making the data set.
#[derive(Clone, Debug, PartialEq)]
pub struct CropSpec {
    /// Side of the square crops, in pixels.
    pub size: u32,
    /// `None`: the non-overlapping grid of tiles; `Some(n)`: n random crops per image (they may overlap, so a
    /// test crop may share pixels with a training crop).
    pub per_image: Option<usize>,
}

/// What [`write_dataset`] makes.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    /// Defect types, one `test/<name>` folder each.
    pub kinds: Vec<DefectKind>,
    /// Defective images per defect type.
    pub count_per_defect: usize,
    /// Fraction of the good images (or crops) that go to `train/good`; the rest are held out for `test/good`
    /// and as the bases of the defective images. At least one image goes to each side.
    pub train_fraction: f64,
    pub seed: u64,
    /// Cut each good image into crops first.
    pub crop: Option<CropSpec>,
    /// Images that `foreign_texture` takes textures from. Empty: good images from another folder (or, with
    /// crops, from another photo) when there are any, and generated textures.
    pub foreign: Vec<PathBuf>,
    /// Write into a non-empty folder: files that a previous run could have written there (`NNN.png` and
    /// `NNN_mask.png` under `train`, `test` and `ground_truth`, and `synth.json`) are deleted first; nothing
    /// else is touched.
    pub force: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            kinds: DefectKind::ALL.to_vec(),
            count_per_defect: 10,
            train_fraction: 0.8,
            seed: 0,
            crop: None,
            foreign: Vec::new(),
            force: false,
        }
    }
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub out: PathBuf,
    /// Good images (or crops) that were read.
    pub sources: usize,
    pub train_good: usize,
    pub test_good: usize,
    /// Defective images written per type.
    pub defects: Vec<(DefectKind, usize)>,
    /// Inputs that were not used, with the reason (the message names the file).
    pub skipped: Vec<(PathBuf, String)>,
}

/// The image files of `inputs`: folders are searched recursively ([`list_images`]: an error names a folder
/// without images), files are taken as they are.
pub fn good_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            out.extend(list_images(p)?.into_iter().map(|(p, _)| p));
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// One good image, or one crop of it.
#[derive(Clone, Copy, Debug)]
struct Item {
    source: usize,
    crop: Option<(u32, u32, u32)>,
    /// Items of different groups show different surfaces (different folders, or different photos).
    group: usize,
}

fn load_item(paths: &[PathBuf], item: &Item) -> Result<RgbImage> {
    let img = load_rgb(&paths[item.source])?;
    Ok(match item.crop {
        Some((x, y, s)) => image::imageops::crop_imm(&img, x, y, s, s).to_image(),
        None => img,
    })
}

/// Encodes PNG: 8-bit gray when every pixel is gray, RGB otherwise.
fn png_bytes(img: &RgbImage, path: &Path) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut buf);
    let (w, h) = img.dimensions();
    let r = if is_gray(img) {
        let g: Vec<u8> = img.pixels().map(|p| p[0]).collect();
        enc.write_image(&g, w, h, image::ExtendedColorType::L8)
    } else {
        enc.write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
    };
    r.map_err(|e| Error::format(path, format!("cannot encode PNG: {e}")))?;
    Ok(buf)
}

fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    atomic_write(path, &png_bytes(img, path)?)
}

fn write_mask(path: &Path, mask: &GrayImage) -> Result<()> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(mask.as_raw(), mask.width(), mask.height(), image::ExtendedColorType::L8)
        .map_err(|e| Error::format(path, format!("cannot encode PNG: {e}")))?;
    atomic_write(path, &buf)
}

/// A random generator for one purpose (`domain`) and one index, independent of every other.
fn rng_for(seed: u64, domain: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((domain << 48) | index);
    rng
}

/// Whether a file name is one [`write_dataset`] writes (`123.png`, `123_mask.png`).
fn is_output_name(name: &str) -> bool {
    let stem = match name.strip_suffix(".png") {
        Some(s) => s.strip_suffix("_mask").unwrap_or(s),
        None => return false,
    };
    !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit())
}

/// Checks that `out` is absent or empty (or, with `force`, deletes what an earlier run wrote), and that no
/// input lies inside it.
fn prepare_out(out: &Path, inputs: &[&PathBuf], force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::Invalid(format!("{}: exists and is not a folder", out.display())));
    }
    if !out.exists() {
        return Ok(());
    }
    let canon = out.canonicalize().map_err(|e| Error::io(out, e))?;
    for p in inputs {
        if p.canonicalize().is_ok_and(|c| c.starts_with(&canon)) {
            return Err(Error::Invalid(format!(
                "input {} is inside the output folder {}: choose an output folder outside the inputs",
                p.display(),
                out.display()
            )));
        }
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_none() {
        return Ok(());
    }
    if !force {
        return Err(Error::Invalid(format!(
            "{}: the output folder exists and is not empty; choose a new folder, or use --force to replace a data \
             set written there before",
            out.display()
        )));
    }
    // Only a folder `synth` wrote (it leaves synth.json) is cleaned: MVTec's own files have the same names.
    if !out.join("synth.json").is_file() {
        return Err(Error::Invalid(format!(
            "{}: --force replaces only a data set written by `csflow synth` (with its synth.json), and this folder \
             has none; choose a new folder",
            out.display()
        )));
    }
    fn clean(dir: &Path) -> Result<()> {
        let Ok(rd) = std::fs::read_dir(dir) else { return Ok(()) };
        for e in rd {
            let p = e.map_err(|e| Error::io(dir, e))?.path();
            if p.is_dir() {
                clean(&p)?;
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(is_output_name) {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }
    for sub in ["train", "test", "ground_truth"] {
        clean(&out.join(sub))?;
    }
    let manifest = out.join("synth.json");
    if manifest.is_file() {
        std::fs::remove_file(&manifest).map_err(|e| Error::io(&manifest, e))?;
    }
    Ok(())
}

/// One file to write.
struct Job {
    /// Relative output path (`train/good/000.png`).
    file: String,
    item: Item,
    defect: Option<DefectJob>,
}

struct DefectJob {
    kind: DefectKind,
    mask_file: String,
    /// Index of this defective image among all of them (its random stream).
    index: u64,
    donors: Vec<Item>,
    foreign: Vec<usize>,
}

/// Writes a synthetic data set in the MVTec AD layout under `out` from the good image files `good` (see the
/// module documentation). `out` must be absent or empty unless `config.force`. Unreadable inputs (and images
/// or crops smaller than [`MIN_SIDE`]) are skipped and listed in the summary; the rest is written. Errors: bad
/// settings, fewer than two usable good images, a non-empty output folder, failed writes.
/// `on_progress(done, total)` is called (from worker threads) after each written file.
pub fn write_dataset(
    good: &[PathBuf],
    out: &Path,
    config: &SynthConfig,
    on_progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<SynthSummary> {
    if !(config.train_fraction > 0.0 && config.train_fraction < 1.0) {
        return Err(Error::Invalid(format!(
            "the training fraction must be between 0 and 1 (exclusive), got {}",
            config.train_fraction
        )));
    }
    if let Some(c) = &config.crop {
        if c.size < MIN_SIDE {
            return Err(Error::Invalid(format!("crop size {} is too small: at least {MIN_SIDE} px", c.size)));
        }
        if c.per_image == Some(0) {
            return Err(Error::Invalid("crops per image must be at least 1".into()));
        }
    }
    let mut kinds: Vec<DefectKind> = Vec::new();
    for &k in &config.kinds {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if good.is_empty() {
        return Err(Error::Invalid("no good images given".into()));
    }
    let inputs: Vec<&PathBuf> = good.iter().chain(&config.foreign).collect();
    prepare_out(out, &inputs, config.force)?;

    // Pass 1: which inputs can be read, and their sizes.
    let dims: Vec<Result<(u32, u32)>> = inputs.par_iter().map(|p| load_rgb(p).map(|i| i.dimensions())).collect();
    let mut skipped = Vec::new();
    let mut items = Vec::new();
    let mut groups: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for (i, d) in dims[..good.len()].iter().enumerate() {
        let (w, h) = match d {
            Ok(d) => *d,
            Err(e) => {
                skipped.push((good[i].clone(), e.to_string()));
                continue;
            }
        };
        let group = match &config.crop {
            Some(_) => i,
            None => {
                let parent = good[i].parent().map(Path::to_path_buf).unwrap_or_default();
                let n = groups.len();
                *groups.entry(parent).or_insert(n)
            }
        };
        let positions = match &config.crop {
            None if w < MIN_SIDE || h < MIN_SIDE => {
                let msg = format!("{}: image is {w} x {h}, smaller than {MIN_SIDE} px", good[i].display());
                skipped.push((good[i].clone(), msg));
                continue;
            }
            None => {
                items.push(Item { source: i, crop: None, group });
                continue;
            }
            Some(c) => match c.per_image {
                None => grid_positions(w, h, c.size),
                Some(n) => random_positions(w, h, c.size, n, &mut rng_for(config.seed, 1, i as u64)),
            },
        };
        if positions.is_empty() {
            let size = config.crop.as_ref().map_or(0, |c| c.size);
            let msg = format!("{}: image is {w} x {h}, smaller than the crop size {size}", good[i].display());
            skipped.push((good[i].clone(), msg));
        }
        let size = config.crop.as_ref().map_or(0, |c| c.size);
        items.extend(positions.into_iter().map(|(x, y)| Item { source: i, crop: Some((x, y, size)), group }));
    }
    let mut foreign = Vec::new();
    for (j, d) in dims[good.len()..].iter().enumerate() {
        match d {
            Ok(_) => foreign.push(good.len() + j),
            Err(e) => skipped.push((config.foreign[j].clone(), e.to_string())),
        }
    }
    if items.len() < 2 {
        let reasons: String = skipped.iter().map(|(_, why)| format!("\n  {why}")).collect();
        // Crops help where one usable image is large enough for several, not where none is usable.
        let hint = if config.crop.is_none() && items.len() == 1 {
            "; to cut one large photo into several images, use crops"
        } else {
            ""
        };
        return Err(Error::Invalid(format!(
            "need at least 2 usable good images (one for training, one for testing), found {} of {} file(s){hint}{reasons}",
            items.len(),
            good.len(),
        )));
    }

    // The split, and what each defective image is made of.
    let mut plan = rng_for(config.seed, 0, 0);
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut plan);
    let n_train = ((items.len() as f64 * config.train_fraction).round() as usize).clamp(1, items.len() - 1);
    let mut train = order[..n_train].to_vec();
    let mut held = order[n_train..].to_vec();
    train.sort_unstable();
    held.sort_unstable();
    let digits = |n: usize| n.saturating_sub(1).to_string().len().max(3);
    let mut jobs = Vec::new();
    let (dt, dh) = (digits(train.len()), digits(held.len()));
    for (k, &i) in train.iter().enumerate() {
        jobs.push(Job { file: format!("train/good/{k:0dt$}.png"), item: items[i], defect: None });
    }
    for (k, &i) in held.iter().enumerate() {
        jobs.push(Job { file: format!("test/good/{k:0dh$}.png"), item: items[i], defect: None });
    }
    let mut bases = held.clone();
    bases.shuffle(&mut plan);
    let dd = digits(config.count_per_defect);
    let mut index = 0u64;
    for &kind in &kinds {
        for k in 0..config.count_per_defect {
            let base = bases[index as usize % bases.len()];
            let group = items[base].group;
            let mut donors = Vec::new();
            let mut foreign_donor = Vec::new();
            match kind {
                DefectKind::CutPaste => {
                    // Another image of the same surface if there is one.
                    let same: Vec<usize> = (0..items.len()).filter(|&j| j != base && items[j].group == group).collect();
                    let pool: Vec<usize> =
                        if same.is_empty() { (0..items.len()).filter(|&j| j != base).collect() } else { same };
                    if let Some(&j) = pool.get(plan.random_range(0..pool.len().max(1))) {
                        donors.push(items[j]);
                    }
                }
                DefectKind::ForeignTexture if !foreign.is_empty() => {
                    foreign_donor.push(foreign[plan.random_range(0..foreign.len())]);
                }
                DefectKind::ForeignTexture => {
                    let other: Vec<usize> = (0..items.len()).filter(|&j| items[j].group != group).collect();
                    if !other.is_empty() {
                        donors.push(items[other[plan.random_range(0..other.len())]]);
                    }
                }
                _ => {}
            }
            jobs.push(Job {
                file: format!("test/{}/{k:0dd$}.png", kind.name()),
                item: items[base],
                defect: Some(DefectJob {
                    kind,
                    mask_file: format!("ground_truth/{}/{k:0dd$}_mask.png", kind.name()),
                    index,
                    donors,
                    foreign: foreign_donor,
                }),
            });
            index += 1;
        }
    }

    // Pass 2: write.
    let mut dirs = vec![out.join("train/good"), out.join("test/good")];
    for kind in &kinds {
        if config.count_per_defect > 0 {
            dirs.push(out.join("test").join(kind.name()));
            dirs.push(out.join("ground_truth").join(kind.name()));
        }
    }
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let all_paths: Vec<PathBuf> = inputs.iter().map(|p| (*p).clone()).collect();
    let done = AtomicUsize::new(0);
    let total = jobs.len();
    let records: Vec<Result<serde_json::Value>> = jobs
        .par_iter()
        .map(|job| {
            let img = load_item(&all_paths, &job.item)?;
            let path = out.join(&job.file);
            let mut record = serde_json::json!({
                "file": job.file,
                "source": all_paths[job.item.source].display().to_string(),
                "crop": job.item.crop.map(|(x, y, s)| serde_json::json!({ "x": x, "y": y, "size": s })),
            });
            match &job.defect {
                None => write_png(&path, &img)?,
                Some(d) => {
                    let mut donors = Vec::new();
                    let mut names = Vec::new();
                    for it in &d.donors {
                        donors.push(load_item(&all_paths, it)?);
                        names.push(serde_json::json!({
                            "source": all_paths[it.source].display().to_string(),
                            "crop": it.crop.map(|(x, y, s)| serde_json::json!({ "x": x, "y": y, "size": s })),
                        }));
                    }
                    for &f in &d.foreign {
                        donors.push(load_rgb(&all_paths[f])?);
                        names.push(serde_json::json!({ "source": all_paths[f].display().to_string() }));
                    }
                    let mut rng = rng_for(config.seed, 2, d.index);
                    let (defective, mask) = add_defect(&img, &donors, d.kind, &mut rng);
                    write_png(&path, &defective)?;
                    write_mask(&out.join(&d.mask_file), &mask)?;
                    let area = mask.as_raw().iter().filter(|&&v| v > 0).count();
                    record["defect"] = d.kind.name().into();
                    record["mask"] = d.mask_file.clone().into();
                    record["mask_fraction"] = (area as f64 / mask.as_raw().len() as f64).into();
                    record["donors"] = names.into();
                }
            }
            on_progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            Ok(record)
        })
        .collect();
    let files = records.into_iter().collect::<Result<Vec<_>>>()?;
    let manifest = serde_json::json!({
        "generator": "csflow synth",
        "seed": config.seed,
        "train_fraction": config.train_fraction,
        "count_per_defect": config.count_per_defect,
        "kinds": kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "crop": config.crop.as_ref().map(|c| serde_json::json!({ "size": c.size, "per_image": c.per_image })),
        "files": files,
    });
    let text = serde_json::to_string_pretty(&manifest).expect("JSON values");
    atomic_write(&out.join("synth.json"), text.as_bytes())?;
    Ok(SynthSummary {
        out: out.to_path_buf(),
        sources: items.len(),
        train_good: train.len(),
        test_good: held.len(),
        defects: kinds.iter().map(|&k| (k, config.count_per_defect)).collect(),
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured test image: value noise plus a gradient; gray or coloured.
    fn texture(w: u32, h: u32, gray: bool, seed: u32) -> RgbImage {
        let n = Noise { seed };
        RgbImage::from_fn(w, h, |x, y| {
            let v = 60.0 + 120.0 * n.fbm(x as f32 / 5.0, y as f32 / 5.0, 3) + 30.0 * x as f32 / w as f32;
            let v = v.clamp(0.0, 255.0) as u8;
            if gray {
                image::Rgb([v, v, v])
            } else {
                image::Rgb([v, v.saturating_sub(30), v / 2 + 40])
            }
        })
    }

    fn flat(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    /// (mask area fraction, mean change over the mask, fraction of mask pixels changed by more than 2).
    fn check(img: &RgbImage, out: &RgbImage, mask: &GrayImage, what: &str) -> (f64, f64, f64) {
        assert_eq!(out.dimensions(), img.dimensions(), "{what}");
        assert_eq!(mask.dimensions(), img.dimensions(), "{what}");
        let (mut area, mut sum, mut changed) = (0usize, 0f64, 0usize);
        for ((p, q), m) in img.pixels().zip(out.pixels()).zip(mask.pixels()) {
            let d = (0..3).map(|c| p[c].abs_diff(q[c])).max().unwrap();
            match m[0] {
                0 => assert_eq!(p, q, "{what}: a pixel outside the mask changed"),
                255 => {
                    area += 1;
                    sum += d as f64;
                    changed += usize::from(d > CHANGE_TOLERANCE);
                }
                v => panic!("{what}: mask value {v}"),
            }
        }
        let frac = area as f64 / (img.width() * img.height()) as f64;
        assert!((MIN_AREA..=MAX_AREA).contains(&frac), "{what}: mask covers {frac}");
        let mean = sum / area as f64;
        assert!(mean >= MIN_VISIBLE as f64, "{what}: mean change {mean}");
        (frac, mean, changed as f64 / area as f64)
    }

    #[test]
    fn every_kind_is_visible_bounded_and_masked_exactly() {
        let donor = texture(80, 70, false, 99);
        for (w, h) in [(64, 64), (128, 96), (256, 256)] {
            for gray in [true, false] {
                let img = texture(w, h, gray, 7);
                for kind in DefectKind::ALL {
                    let mut fracs = Vec::new();
                    for seed in 0..12u64 {
                        let mut rng = ChaCha8Rng::seed_from_u64(seed);
                        let (out, mask) = add_defect(&img, std::slice::from_ref(&donor), kind, &mut rng);
                        let what = format!("{kind} {w}x{h} gray {gray} seed {seed}");
                        let (frac, _, changed) = check(&img, &out, &mask, &what);
                        // Most masked pixels really changed (the rest: the surface already had the colour).
                        assert!(changed >= 0.6, "{what}: only {changed} of the mask changed");
                        if gray {
                            assert!(is_gray(&out), "{what}: a gray image became coloured");
                        }
                        fracs.push(frac);
                    }
                    // Sizes vary from draw to draw.
                    let (lo, hi) = fracs.iter().fold((1.0f64, 0.0f64), |(a, b), &f| (a.min(f), b.max(f)));
                    assert!(hi > 1.3 * lo, "{kind} {w}x{h}: sizes {lo}..{hi}");
                }
            }
        }
    }

    #[test]
    fn hard_edged_cut_paste_has_binary_weights() {
        // Every masked pixel of a cut-paste is the (jittered) copy: on a flat image with a flat donor all masked
        // pixels get the same value.
        let img = flat(96, 96, 100);
        for seed in 0..8 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (out, mask) = add_defect(&img, &[], DefectKind::CutPaste, &mut rng);
            check(&img, &out, &mask, "cut_paste on flat");
            let vals: std::collections::BTreeSet<u8> =
                out.pixels().zip(mask.pixels()).filter(|(_, m)| m[0] == 255).map(|(p, _)| p[0]).collect();
            assert_eq!(vals.len(), 1, "seed {seed}: {vals:?}");
        }
    }

    #[test]
    fn flat_and_saturated_images_still_get_visible_defects() {
        for v in [0u8, 128, 255] {
            let img = flat(64, 64, v);
            for kind in DefectKind::ALL {
                for seed in 0..6 {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let (out, mask) = add_defect(&img, &[], kind, &mut rng);
                    check(&img, &out, &mask, &format!("{kind} on flat {v} seed {seed}"));
                }
            }
        }
    }

    #[test]
    fn soft_stain_edges_fade_and_the_fringe_is_untouched() {
        // A stain's weight falls off smoothly: masked pixels next to unmasked ones change less than the core.
        let img = flat(128, 128, 128);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (out, mask) = add_defect(&img, &[], DefectKind::Stain, &mut rng);
        check(&img, &out, &mask, "stain");
        let (mut edge, mut ne, mut core, mut nc) = (0f64, 0, 0f64, 0);
        for y in 1..127 {
            for x in 1..127 {
                if mask.get_pixel(x, y)[0] == 0 {
                    continue;
                }
                let d = out.get_pixel(x, y)[0].abs_diff(128) as f64;
                let border =
                    [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)].iter().any(|&(a, b)| mask.get_pixel(a, b)[0] == 0);
                if border {
                    edge += d;
                    ne += 1;
                } else {
                    core += d;
                    nc += 1;
                }
            }
        }
        assert!(ne > 0 && nc > 0);
        assert!(edge / (ne as f64) < 0.5 * core / nc as f64, "edge {} core {}", edge / ne as f64, core / nc as f64);
        // A soft edge: the largest change at the mask's border is a few grey levels.
        assert!(edge / (ne as f64) < 12.0);
    }

    #[test]
    fn same_seed_same_defect_other_seed_other_defect() {
        let img = texture(96, 80, false, 1);
        let donor = texture(64, 64, true, 2);
        for kind in DefectKind::ALL {
            let run =
                |seed: u64| add_defect(&img, std::slice::from_ref(&donor), kind, &mut ChaCha8Rng::seed_from_u64(seed));
            let (a, ma) = run(5);
            let (b, mb) = run(5);
            assert_eq!(a.as_raw(), b.as_raw(), "{kind}");
            assert_eq!(ma.as_raw(), mb.as_raw(), "{kind}");
            let (c, mc) = run(6);
            assert!(a.as_raw() != c.as_raw() && ma.as_raw() != mc.as_raw(), "{kind}");
        }
    }

    #[test]
    fn tiny_and_narrow_images_do_not_panic() {
        for (w, h) in [(1, 1), (2, 7), (8, 8), (40, 10), (300, 33)] {
            let img = texture(w, h, false, 5);
            for kind in DefectKind::ALL {
                let mut rng = ChaCha8Rng::seed_from_u64(1);
                let (out, mask) = add_defect(&img, std::slice::from_ref(&img), kind, &mut rng);
                assert_eq!((out.dimensions(), mask.dimensions()), ((w, h), (w, h)));
                for ((p, q), m) in img.pixels().zip(out.pixels()).zip(mask.pixels()) {
                    assert!(m[0] == 255 || p == q);
                }
            }
        }
    }

    #[test]
    fn kind_names_round_trip() {
        for k in DefectKind::ALL {
            assert_eq!(k.name().parse::<DefectKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!("Cut-Paste".parse::<DefectKind>().unwrap(), DefectKind::CutPaste);
        assert!("crack".parse::<DefectKind>().unwrap_err().contains("scratch, spot"));
    }

    #[test]
    fn crops_have_the_size_and_content_asked_for() {
        let img = texture(100, 70, false, 4);
        let tiles = grid_crops(&img, 32);
        assert_eq!(tiles.len(), 3 * 2);
        assert_eq!(grid_positions(100, 70, 32)[0], (2, 3));
        assert_eq!(tiles[0].get_pixel(0, 0), img.get_pixel(2, 3));
        assert!(grid_crops(&img, 80).is_empty());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let crops = random_crops(&img, 40, 5, &mut rng);
        assert_eq!(crops.len(), 5);
        assert!(crops.iter().all(|c| c.dimensions() == (40, 40)));
        let again = random_crops(&img, 40, 5, &mut ChaCha8Rng::seed_from_u64(1));
        assert!(crops.iter().zip(&again).all(|(a, b)| a.as_raw() == b.as_raw()));
        assert!(random_crops(&img, 71, 3, &mut rng).is_empty());
        assert_eq!(random_crops(&img, 70, 2, &mut rng).len(), 2);
    }

    fn save(path: &Path, img: &RgbImage) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }

    /// Every file under `dir`, relative path to bytes.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn write_dataset_makes_the_mvtec_layout_reproducibly() {
        let tmp = tempfile::tempdir().unwrap();
        let good_dir = tmp.path().join("good");
        for i in 0..6u32 {
            save(&good_dir.join(format!("a/{i}.png")), &texture(64, 48, true, i));
        }
        for i in 0..3u32 {
            save(&good_dir.join(format!("b/{i}.jpg")), &texture(64, 64, false, 10 + i));
        }
        std::fs::write(good_dir.join("a/broken.png"), b"not a png").unwrap();
        let good = good_images(std::slice::from_ref(&good_dir)).unwrap();
        assert_eq!(good.len(), 10);
        let config = SynthConfig { count_per_defect: 3, train_fraction: 0.7, seed: 11, ..Default::default() };
        let out = tmp.path().join("out");
        let calls = AtomicUsize::new(0);
        let summary = write_dataset(&good, &out, &config, &|_, _| {
            calls.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(summary.sources, 9);
        assert_eq!((summary.train_good, summary.test_good), (6, 3));
        assert_eq!(summary.skipped.len(), 1);
        assert_eq!(summary.skipped[0].0, good_dir.join("a/broken.png"));
        assert!(summary.skipped[0].1.contains("broken.png"), "{}", summary.skipped[0].1);
        assert_eq!(calls.load(Ordering::Relaxed), 6 + 3 + 5 * 3);

        assert_eq!(names(&out), ["ground_truth", "synth.json", "test", "train"]);
        assert_eq!(names(&out.join("train/good")), ["000.png", "001.png", "002.png", "003.png", "004.png", "005.png"]);
        assert_eq!(names(&out.join("test/good")), ["000.png", "001.png", "002.png"]);
        let mut test_dirs = names(&out.join("test"));
        test_dirs.retain(|d| d != "good");
        let mut kinds: Vec<&str> = DefectKind::ALL.iter().map(|k| k.name()).collect();
        kinds.sort();
        assert_eq!(test_dirs, kinds);
        assert_eq!(names(&out.join("ground_truth")), kinds);
        for kind in DefectKind::ALL {
            assert_eq!(names(&out.join("test").join(kind.name())), ["000.png", "001.png", "002.png"]);
            assert_eq!(
                names(&out.join("ground_truth").join(kind.name())),
                ["000_mask.png", "001_mask.png", "002_mask.png"]
            );
            for i in 0..3 {
                let img = load_rgb(&out.join(format!("test/{}/{i:03}.png", kind.name()))).unwrap();
                let mask = image::open(out.join(format!("ground_truth/{}/{i:03}_mask.png", kind.name()))).unwrap();
                assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)), "masks are 8-bit gray");
                let mask = mask.to_luma8();
                assert_eq!(img.dimensions(), mask.dimensions());
                let area = mask.pixels().filter(|p| p[0] == 255).count();
                assert_eq!(area + mask.pixels().filter(|p| p[0] == 0).count(), mask.as_raw().len());
                let frac = area as f64 / mask.as_raw().len() as f64;
                assert!((MIN_AREA..=MAX_AREA).contains(&frac), "{kind} {i}: {frac}");
            }
        }
        // The held-out good images are written unchanged (gray ones as 8-bit gray PNG).
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("synth.json")).unwrap()).unwrap();
        let files = manifest["files"].as_array().unwrap();
        assert_eq!(files.len(), 6 + 3 + 15);
        for f in files {
            let written = load_rgb(&out.join(f["file"].as_str().unwrap())).unwrap();
            let source = load_rgb(Path::new(f["source"].as_str().unwrap())).unwrap();
            assert_eq!(written.dimensions(), source.dimensions());
            match f["defect"].as_str() {
                None => assert_eq!(written.as_raw(), source.as_raw()),
                Some(_) => {
                    // Pixels outside the mask are the source's.
                    let mask = image::open(out.join(f["mask"].as_str().unwrap())).unwrap().to_luma8();
                    for ((a, b), m) in written.pixels().zip(source.pixels()).zip(mask.pixels()) {
                        if m[0] == 0 {
                            assert_eq!(a, b);
                        }
                    }
                }
            }
            // No defective image is made from a training image.
            if f["defect"].is_string() {
                assert!(!files
                    .iter()
                    .any(|g| g["file"].as_str().unwrap().starts_with("train/") && g["source"] == f["source"]));
            }
        }
        let first = tree(&out);

        // The same inputs and seed: the same bytes, with any number of threads.
        let out2 = tmp.path().join("out2");
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| write_dataset(&good, &out2, &config, &|_, _| {})).unwrap();
        assert_eq!(tree(&out2), first);

        // Another seed: other images.
        let out3 = tmp.path().join("out3");
        write_dataset(&good, &out3, &SynthConfig { seed: 12, ..config.clone() }, &|_, _| {}).unwrap();
        let third = tree(&out3);
        assert_eq!(third.keys().collect::<Vec<_>>(), first.keys().collect::<Vec<_>>());
        assert_ne!(third.get(Path::new("test/scratch/000.png")), first.get(Path::new("test/scratch/000.png")));

        // A non-empty folder is refused; with force the old data set is replaced, other files are kept.
        let err = write_dataset(&good, &out, &config, &|_, _| {}).unwrap_err().to_string();
        assert!(err.contains("not empty") && err.contains("out"), "{err}");
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        std::fs::write(out.join("test/scratch/999.png"), b"stale").unwrap();
        write_dataset(&good, &out, &SynthConfig { force: true, ..config.clone() }, &|_, _| {}).unwrap();
        let mut again = tree(&out);
        assert_eq!(again.remove(Path::new("notes.txt")).unwrap(), b"mine");
        assert_eq!(again, first);

        // A folder csflow did not write (an MVTec category has the same file names) is never cleaned.
        let real = tmp.path().join("real");
        std::fs::create_dir_all(real.join("train/good")).unwrap();
        std::fs::write(real.join("train/good/000.png"), b"precious").unwrap();
        let err = write_dataset(&good, &real, &SynthConfig { force: true, ..config.clone() }, &|_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("synth.json"), "{err}");
        assert_eq!(std::fs::read(real.join("train/good/000.png")).unwrap(), b"precious");

        // Inputs inside the output folder are refused even with force (they would be deleted).
        let inner = out.join("train/good/000.png");
        let err = write_dataset(&[inner.clone(), inner], &out, &SynthConfig { force: true, ..config }, &|_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the output folder"), "{err}");
    }

    #[test]
    fn crops_make_a_data_set_from_one_photo() {
        let tmp = tempfile::tempdir().unwrap();
        let photo = tmp.path().join("photo.png");
        save(&photo, &texture(200, 130, true, 3));
        let out = tmp.path().join("out");
        let config = SynthConfig {
            count_per_defect: 1,
            crop: Some(CropSpec { size: 64, per_image: None }),
            kinds: vec![DefectKind::Spot, DefectKind::ForeignTexture],
            ..Default::default()
        };
        let s = write_dataset(std::slice::from_ref(&photo), &out, &config, &|_, _| {}).unwrap();
        assert_eq!(s.sources, 6);
        assert_eq!((s.train_good, s.test_good), (5, 1));
        assert_eq!(names(&out.join("test")), ["foreign_texture", "good", "spot"]);
        let img = load_rgb(&out.join("test/spot/000.png")).unwrap();
        assert_eq!(img.dimensions(), (64, 64));

        // Random crops, reproducible.
        let config = SynthConfig { crop: Some(CropSpec { size: 48, per_image: Some(9) }), ..config };
        let s = write_dataset(std::slice::from_ref(&photo), &tmp.path().join("r1"), &config, &|_, _| {}).unwrap();
        assert_eq!(s.sources, 9);
        write_dataset(std::slice::from_ref(&photo), &tmp.path().join("r2"), &config, &|_, _| {}).unwrap();
        assert_eq!(tree(&tmp.path().join("r1")), tree(&tmp.path().join("r2")));
    }

    #[test]
    fn unusable_inputs_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = good_images(std::slice::from_ref(&empty)).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("no images"), "{err}");

        let one = tmp.path().join("one.png");
        save(&one, &texture(64, 64, true, 1));
        let bad = tmp.path().join("bad.png");
        std::fs::write(&bad, b"").unwrap();
        let out = tmp.path().join("out");
        let err =
            write_dataset(&[one.clone(), bad], &out, &SynthConfig::default(), &|_, _| {}).unwrap_err().to_string();
        assert!(err.contains("at least 2") && err.contains("crops"), "{err}");
        assert!(err.contains("bad.png"), "the reason each file was left out: {err}");
        assert!(!out.exists(), "nothing is written on error");
        // Every image too small for the crop: the reasons, and no advice to use crops.
        let err = write_dataset(
            &[one.clone(), one.clone()],
            &out,
            &SynthConfig { crop: Some(CropSpec { size: 200, per_image: None }), ..Default::default() },
            &|_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("smaller than the crop size 200") && !err.contains("use crops"), "{err}");

        let err = write_dataset(
            &[one.clone(), one],
            &out,
            &SynthConfig { train_fraction: 1.0, ..Default::default() },
            &|_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
    }
}

#[cfg(test)]
mod look {
    use super::*;

    fn assets() -> Option<Vec<RgbImage>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets");
        ["brick", "grass", "gravel"].iter().map(|n| load_rgb(&dir.join(format!("{n}.png"))).ok()).collect()
    }

    /// On the real texture photos (skipped when assets/ has not been set up), at full size and as 128 px crops:
    /// every draw meets the bounds without falling back.
    #[test]
    fn defects_on_texture_photos_meet_the_bounds() {
        let Some(imgs) = assets() else {
            eprintln!("assets/ not set up (scripts/setup.sh): skipped");
            return;
        };
        for (t, img) in imgs.iter().enumerate() {
            let crops = grid_crops(img, 128);
            let donor = &imgs[(t + 1) % 3];
            for kind in DefectKind::ALL {
                for seed in 0..24u64 {
                    let base = if seed % 2 == 0 { img } else { &crops[seed as usize % crops.len()] };
                    let (out, mask) =
                        add_defect(base, std::slice::from_ref(donor), kind, &mut ChaCha8Rng::seed_from_u64(seed));
                    let total = mask.as_raw().len() as f64;
                    let (mut area, mut change) = (0usize, 0f64);
                    for ((p, q), m) in base.pixels().zip(out.pixels()).zip(mask.pixels()) {
                        if m[0] > 0 {
                            area += 1;
                            change += p[0].abs_diff(q[0]) as f64;
                        } else {
                            assert_eq!(p, q);
                        }
                    }
                    let what = format!("{kind} texture {t} seed {seed}");
                    assert!((MIN_AREA..=MAX_AREA).contains(&(area as f64 / total)), "{what}: {}", area as f64 / total);
                    assert!(change / area as f64 >= MIN_VISIBLE as f64, "{what}: {}", change / area as f64);
                }
            }
        }
    }

    /// Writes examples from assets/ to /tmp/synth_look: per texture and kind, the defective image beside its
    /// mask outline. `cargo test --release -p csflow --lib synth::look -- --ignored`.
    #[test]
    #[ignore]
    fn look() {
        let imgs = assets().expect("assets/ (scripts/setup.sh)");
        let out = Path::new("/tmp/synth_look");
        std::fs::create_dir_all(out).unwrap();
        let names = ["brick", "grass", "gravel"];
        for (t, name) in names.iter().enumerate() {
            let tiles = grid_crops(&imgs[t], 256);
            let others: Vec<RgbImage> =
                (0..3).filter(|&o| o != t).map(|o| grid_crops(&imgs[o], 256)[1].clone()).collect();
            for kind in DefectKind::ALL {
                let mut sheet = RgbImage::new(256 * 4, 256 * 2);
                for s in 0..4u64 {
                    let base = &tiles[s as usize % tiles.len()];
                    let donors: Vec<RgbImage> = match kind {
                        DefectKind::CutPaste => vec![tiles[(s as usize + 1) % tiles.len()].clone()],
                        DefectKind::ForeignTexture => others.clone(),
                        _ => vec![],
                    };
                    let (img, mask) = add_defect(base, &donors, kind, &mut rng_for(s, 2, t as u64));
                    image::imageops::replace(&mut sheet, &img, 256 * s as i64, 0);
                    // Below: the image with the mask's outline in red.
                    let mut o = img.clone();
                    for y in 0..256 {
                        for x in 0..256 {
                            let m = |x: i64, y: i64| {
                                x >= 0 && y >= 0 && x < 256 && y < 256 && mask.get_pixel(x as u32, y as u32)[0] > 0
                            };
                            let (xi, yi) = (x as i64, y as i64);
                            if m(xi, yi) && !(m(xi - 1, yi) && m(xi + 1, yi) && m(xi, yi - 1) && m(xi, yi + 1)) {
                                o.put_pixel(x, y, image::Rgb([255, 0, 0]));
                            }
                        }
                    }
                    image::imageops::replace(&mut sheet, &o, 256 * s as i64, 256);
                    let mut pair = RgbImage::new(512, 256);
                    image::imageops::replace(&mut pair, &img, 0, 0);
                    image::imageops::replace(&mut pair, &o, 256, 0);
                    pair.save(out.join(format!("{name}_{}_{s}.png", kind.name()))).unwrap();
                }
                sheet.save(out.join(format!("{name}_{}.png", kind.name()))).unwrap();
            }
        }
    }
}
