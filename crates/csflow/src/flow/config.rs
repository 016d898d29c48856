/// The shape of a flow: everything its weights do not already say, plus what they do.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlowConfig {
    /// Feature channels C (even): the coupling splits them in halves.
    pub channels: usize,
    /// Hidden width of the subnets (paper: 1024).
    pub hidden: usize,
    /// Kernel size of each coupling block's subnets; the number of blocks is its length.
    pub kernel_sizes: Vec<usize>,
    /// Soft-clamp constant a in a * 0.636 * atan(s / a).
    pub clamp: f64,
}

/// The flow always works on three scales: the cross convolutions connect exactly 0-1 and 1-2.
pub const N_SCALES: usize = 3;

impl FlowConfig {
    /// The paper's setting: EfficientNet-B5 features (304 channels), hidden 1024, kernels [3, 3, 3, 5].
    pub fn paper() -> Self {
        Self::new(304, 1024)
    }

    /// The paper's block layout for other feature widths.
    pub fn new(channels: usize, hidden: usize) -> Self {
        Self { channels, hidden, kernel_sizes: vec![3, 3, 3, 5], clamp: 3.0 }
    }

    pub fn n_blocks(&self) -> usize {
        self.kernel_sizes.len()
    }

    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Invalid(m));
        if self.channels < 2 || !self.channels.is_multiple_of(2) {
            return bad(format!("the flow needs an even number of channels, got {}", self.channels));
        }
        if self.hidden == 0 {
            return bad("the hidden width must be positive".into());
        }
        if self.kernel_sizes.is_empty() {
            return bad("the flow needs at least one coupling block".into());
        }
        if let Some(k) = self.kernel_sizes.iter().find(|&&k| k % 2 == 0) {
            return bad(format!("kernel sizes must be odd, got {k}"));
        }
        if !(self.clamp > 0.0 && self.clamp.is_finite()) {
            return bad(format!("the clamp must be positive, got {}", self.clamp));
        }
        Ok(())
    }

    /// Index of coupling block `k` in the authors' `module_list` (3 input nodes, then permute/coupling pairs).
    pub fn module_index(block: usize) -> usize {
        4 + 2 * block
    }

    /// Every parameter's name (the authors' state_dict names) and shape, in a fixed order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, h) = (self.channels, self.hidden);
        let mut out = Vec::new();
        for (b, &k) in self.kernel_sizes.iter().enumerate() {
            for s in ["s1", "s2"] {
                let p = format!("module_list.{}.{s}", Self::module_index(b));
                for g in ["gamma0", "gamma1", "gamma2"] {
                    out.push((format!("{p}.{g}"), vec![1]));
                }
                for (conv, cin, cout) in crate::flow::subnet::CONVS.iter().map(|&n| {
                    if n.ends_with("_0") && n.starts_with("conv_scale") {
                        (n, c / 2, h)
                    } else {
                        (n, h, c)
                    }
                }) {
                    out.push((format!("{p}.{conv}.weight"), vec![cout, cin, k, k]));
                    out.push((format!("{p}.{conv}.bias"), vec![cout]));
                }
            }
        }
        out
    }
}
