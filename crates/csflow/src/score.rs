//! Image scores and anomaly maps from the flow's latents (SPEC 1.4).

use candle_core::Tensor;
use csflow_kernels::bilinear_resize;

use crate::flow::FlowOutput;
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

/// Image score per sample: mean over all D latent entries of z^2 / 2 (no log-det term), [B].
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
