//! Image scores and anomaly maps from the flow's latents (SPEC 1.4).

use candle_core::Tensor;
use csflow_kernels::bilinear_resize;

use crate::flow::{CsFlow, FlowOutput};
use crate::Result;

/// How the per-scale maps become the one map shown to users.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapMode {
    /// Scale 0 upsampled (the authors' evaluation).
    #[default]
    Scale0,
    /// The product of the three upsampled scale maps (anomalib's default).
    Product,
}

/// Image score per sample: mean over all D latent entries of z^2 / 2 (no log-det term), `[B]`.
pub fn image_scores(out: &FlowOutput) -> Result<Tensor> {
    let flat = crate::flow::flatten_z(&out.z)?;
    Ok((flat.sqr()?.mean(1)? / 2.0)?)
}

/// Per-scale anomaly maps: mean over channels of z_i^2, each [B, h_i, w_i].
pub fn scale_maps(out: &FlowOutput) -> Result<[Tensor; 3]> {
    let m = |t: &Tensor| t.sqr()?.mean(1);
    Ok([m(&out.z[0])?, m(&out.z[1])?, m(&out.z[2])?])
}

/// The anomaly map at `(height, width)` (the original image size), bilinear with align_corners = false.
pub fn anomaly_map(out: &FlowOutput, mode: MapMode, height: usize, width: usize) -> Result<Tensor> {
    let maps = scale_maps(out)?;
    let up = |m: &Tensor| -> Result<Tensor> { Ok(bilinear_resize(&m.unsqueeze(1)?, height, width)?.squeeze(1)?) };
    match mode {
        MapMode::Scale0 => up(&maps[0]),
        MapMode::Product => Ok(((up(&maps[0])? * up(&maps[1])?)? * up(&maps[2])?)?),
    }
}

/// Image scores of all samples of a features set, in batches, and optionally each sample's anomaly map
/// (`maps`: mode, height, width), row-major.
pub fn score_features(
    flow: &CsFlow,
    scales: &[Tensor; 3],
    batch: usize,
    maps: Option<(MapMode, usize, usize)>,
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let n = scales[0].dim(0)?;
    let (mut scores, mut out_maps) = (Vec::with_capacity(n), Vec::new());
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let x = [scales[0].narrow(0, start, len)?, scales[1].narrow(0, start, len)?, scales[2].narrow(0, start, len)?];
        let out = flow.forward(&x)?;
        scores.extend(image_scores(&out)?.to_vec1::<f32>()?);
        if let Some((mode, h, w)) = maps {
            out_maps.extend(anomaly_map(&out, mode, h, w)?.flatten_from(1)?.to_vec2::<f32>()?);
        }
    }
    Ok((scores, out_maps))
}
