//! A small synthetic features data set, for trying the flow before any backbone is involved: good samples
//! are mixtures of a few fixed smooth patterns plus noise; defective ones add a local bump in a random
//! channel direction. Coarser scales are 2x2 average pools of the finer one, as a CNN pyramid roughly is.

use candle_core::{Device, Tensor};

use crate::flow::permutation::Mt19937;
use crate::io::FeatureSet;
use crate::Result;

struct Gauss(Mt19937);

impl Gauss {
    fn uniform(&mut self) -> f64 {
        (self.0.next_u32() as f64 + 0.5) / 4_294_967_296.0
    }

    /// A standard normal draw (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn pool2(x: &[f32], c: usize, m: usize) -> Vec<f32> {
    let h = m / 2;
    let mut out = vec![0f32; c * h * h];
    for ch in 0..c {
        for y in 0..h {
            for xx in 0..h {
                let at = |dy: usize, dx: usize| x[ch * m * m + (2 * y + dy) * m + 2 * xx + dx];
                // x2 rather than /4 keeps the variance of averaged independent noise near the finer scale's.
                out[ch * h * h + y * h + xx] = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 2.0;
            }
        }
    }
    out
}

/// Train (good only) and test (half good, half with a defect; labelled) sets with `channels` channels and
/// maps of `map`, `map/2`, `map/4` (map must be a multiple of 4).
pub fn toy_features(
    n_train: usize,
    n_test: usize,
    channels: usize,
    map: usize,
    seed: u32,
) -> Result<(FeatureSet, FeatureSet)> {
    if !map.is_multiple_of(4) || map == 0 {
        return Err(crate::Error::Invalid(format!("the map size must be a positive multiple of 4, got {map}")));
    }
    let mut g = Gauss(Mt19937::new(seed));
    let plane = channels * map * map;
    const PATTERNS: usize = 4;
    // Smooth fixed patterns: random channel loadings times low-frequency waves. Their phases and frequencies
    // use 6.28 and 3.14, not τ and π: the toy sets are defined by these values.
    #[allow(clippy::approx_constant)]
    let patterns: Vec<Vec<f32>> = (0..PATTERNS)
        .map(|k| {
            let load: Vec<f32> = (0..channels).map(|_| g.normal()).collect();
            let (fy, fx, ph) = (1.0 + k as f32, 1.0 + ((k * 7) % 3) as f32, g.uniform() as f32 * 6.28);
            (0..plane)
                .map(|i| {
                    let (ch, y, x) = (i / (map * map), (i / map) % map, i % map);
                    let wave = (fy * y as f32 / map as f32 * 3.14 + fx * x as f32 / map as f32 * 3.14 + ph).sin();
                    load[ch] * wave
                })
                .collect()
        })
        .collect();
    let sample = |defect: bool, g: &mut Gauss| -> Vec<f32> {
        let coef: Vec<f32> = (0..PATTERNS).map(|_| g.normal()).collect();
        let mut x: Vec<f32> = (0..plane)
            .map(|i| coef.iter().zip(&patterns).map(|(a, p)| a * p[i]).sum::<f32>() * 0.5 + 0.3 * g.normal())
            .collect();
        if defect {
            let dir: Vec<f32> = (0..channels).map(|_| g.normal()).collect();
            let norm = dir.iter().map(|d| d * d).sum::<f32>().sqrt();
            let (cy, cx) = ((g.uniform() * (map - 2) as f64) as usize, (g.uniform() * (map - 2) as f64) as usize);
            for (ch, d) in dir.iter().enumerate() {
                for y in cy..cy + 3 {
                    for xx in cx..cx + 3 {
                        x[ch * map * map + y * map + xx] += 3.0 * (channels as f32).sqrt() * d / norm;
                    }
                }
            }
        }
        x
    };
    let build = |n: usize, defects: &[bool], g: &mut Gauss, prefix: &str| -> Result<FeatureSet> {
        let (mut s0, mut s1, mut s2) = (Vec::new(), Vec::new(), Vec::new());
        for &d in defects.iter().take(n) {
            let x0 = sample(d, g);
            let x1 = pool2(&x0, channels, map);
            let x2 = pool2(&x1, channels, map / 2);
            s0.extend(x0);
            s1.extend(x1);
            s2.extend(x2);
        }
        let t = |v: Vec<f32>, m: usize| Tensor::from_vec(v, (n, channels, m, m), &Device::Cpu);
        let paths = (0..n).map(|i| format!("{prefix}/{}_{i:03}", if defects[i] { "defect" } else { "good" })).collect();
        Ok(FeatureSet {
            scales: [t(s0, map)?, t(s1, map / 2)?, t(s2, map / 4)?],
            paths,
            labels: Some(defects.iter().map(|&d| d as u8).collect()),
            extra: Default::default(),
        })
    };
    let mut train = build(n_train, &vec![false; n_train], &mut g, "train")?;
    train.labels = None;
    let test_defects: Vec<bool> = (0..n_test).map(|i| i >= n_test / 2).collect();
    let test = build(n_test, &test_defects, &mut g, "test")?;
    Ok((train, test))
}
