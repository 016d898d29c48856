use crate::{Error, Result};

/// One MBConv block after width/depth scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockConfig {
    pub kernel: usize,
    pub stride: usize,
    pub expand_ratio: usize,
    pub input_filters: usize,
    pub output_filters: usize,
    /// Squeeze-excitation width (0.25 of the block's input channels, at least 1); `None` for Lite.
    pub se_channels: Option<usize>,
    /// Residual connection: the package adds it to the repeated blocks of a stage, never the first.
    pub skip: bool,
    /// Native image size at the block's input; the "static same" padding is computed from it.
    pub native_in: [usize; 2],
}

/// A whole EfficientNet: stem, blocks, head, and what the padding and activations follow.
#[derive(Clone, Debug, PartialEq)]
pub struct EfficientNetConfig {
    pub name: String,
    pub native_size: usize,
    pub stem_channels: usize,
    pub head_channels: usize,
    pub blocks: Vec<BlockConfig>,
    /// Lite: ReLU6 instead of swish, no squeeze-excitation.
    pub lite: bool,
    pub num_classes: usize,
    /// Index of the block whose output is the CS-Flow feature map (the last block at stride 32).
    pub feature_block: usize,
}

/// The stage table shared by every variant: (repeats, kernel, stride, expand, in, out).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// The package's `round_filters`: scale, round to a multiple of 8, never more than 10 % down.
fn round_filters(filters: usize, width: f64) -> usize {
    let f = filters as f64 * width;
    let mut new = (8usize).max(((f + 4.0) as usize) / 8 * 8);
    if (new as f64) < 0.9 * f {
        new += 8;
    }
    new
}

fn round_repeats(repeats: usize, depth: f64) -> usize {
    (depth * repeats as f64).ceil() as usize
}

/// ceil(size / stride): the package's `calculate_output_image_size`.
fn out_size(size: [usize; 2], stride: usize) -> [usize; 2] {
    [size[0].div_ceil(stride), size[1].div_ceil(stride)]
}

impl EfficientNetConfig {
    fn build(name: &str, width: f64, depth: f64, native: usize, lite: bool) -> Self {
        let stem = if lite { 32 } else { round_filters(32, width) };
        let head = if lite { 1280 } else { round_filters(1280, width) };
        let mut blocks = Vec::new();
        let mut size = out_size([native, native], 2);
        let mut feature_block = 0;
        for (i, &(r, k, s, e, cin, cout)) in STAGES.iter().enumerate() {
            let fixed = lite && (i == 0 || i == STAGES.len() - 1);
            let repeats = if fixed { r } else { round_repeats(r, depth) };
            let mut input = if lite && i == 0 { 32 } else { round_filters(cin, width) };
            let output = round_filters(cout, width);
            for j in 0..repeats {
                let stride = if j == 0 { s } else { 1 };
                blocks.push(BlockConfig {
                    kernel: k,
                    stride,
                    expand_ratio: e,
                    input_filters: input,
                    output_filters: output,
                    se_channels: (!lite).then(|| ((input as f64 * 0.25) as usize).max(1)),
                    skip: j > 0 && input == output,
                    native_in: size,
                });
                size = out_size(size, stride);
                input = output;
            }
            if i == 5 {
                feature_block = blocks.len() - 1;
            }
        }
        Self {
            name: name.into(),
            native_size: native,
            stem_channels: stem,
            head_channels: head,
            blocks,
            lite,
            num_classes: 1000,
            feature_block,
        }
    }

    pub fn b0() -> Self {
        Self::build("efficientnet-b0", 1.0, 1.0, 224, false)
    }
    pub fn b1() -> Self {
        Self::build("efficientnet-b1", 1.0, 1.1, 240, false)
    }
    pub fn b2() -> Self {
        Self::build("efficientnet-b2", 1.1, 1.2, 260, false)
    }
    pub fn b3() -> Self {
        Self::build("efficientnet-b3", 1.2, 1.4, 300, false)
    }
    pub fn b4() -> Self {
        Self::build("efficientnet-b4", 1.4, 1.8, 380, false)
    }
    pub fn b5() -> Self {
        Self::build("efficientnet-b5", 1.6, 2.2, 456, false)
    }
    pub fn b6() -> Self {
        Self::build("efficientnet-b6", 1.8, 2.6, 528, false)
    }
    pub fn b7() -> Self {
        Self::build("efficientnet-b7", 2.0, 3.1, 600, false)
    }
    pub fn lite0() -> Self {
        Self::build("efficientnet-lite0", 1.0, 1.0, 224, true)
    }
    pub fn lite1() -> Self {
        Self::build("efficientnet-lite1", 1.0, 1.1, 240, true)
    }
    pub fn lite2() -> Self {
        Self::build("efficientnet-lite2", 1.1, 1.2, 260, true)
    }
    pub fn lite3() -> Self {
        Self::build("efficientnet-lite3", 1.2, 1.4, 280, true)
    }
    pub fn lite4() -> Self {
        Self::build("efficientnet-lite4", 1.4, 1.8, 300, true)
    }

    /// The configuration for a name as the packages spell it (`efficientnet-b5`, `efficientnet-lite0`).
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "efficientnet-b0" => Self::b0(),
            "efficientnet-b1" => Self::b1(),
            "efficientnet-b2" => Self::b2(),
            "efficientnet-b3" => Self::b3(),
            "efficientnet-b4" => Self::b4(),
            "efficientnet-b5" => Self::b5(),
            "efficientnet-b6" => Self::b6(),
            "efficientnet-b7" => Self::b7(),
            "efficientnet-lite0" => Self::lite0(),
            "efficientnet-lite1" => Self::lite1(),
            "efficientnet-lite2" => Self::lite2(),
            "efficientnet-lite3" => Self::lite3(),
            "efficientnet-lite4" => Self::lite4(),
            _ => return Err(Error::Invalid(format!(
                "unknown backbone `{name}`; known: efficientnet-b0 .. efficientnet-b7, efficientnet-lite0 .. efficientnet-lite4"
            ))),
        })
    }

    /// Channels at the output of block `idx`.
    pub fn channels_at(&self, idx: usize) -> usize {
        self.blocks[idx].output_filters
    }
}

/// "Static same" padding (top, bottom) or (left, right) for one axis of a convolution, from the native size.
pub(crate) fn same_padding(native: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = native.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(native);
    (total / 2, total - total / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_shapes() {
        let b5 = EfficientNetConfig::b5();
        assert_eq!(b5.blocks.len(), 39);
        assert_eq!(b5.feature_block, 35);
        assert_eq!(b5.channels_at(35), 304);
        assert_eq!(b5.stem_channels, 48);
        assert_eq!(b5.head_channels, 2048);
        let b0 = EfficientNetConfig::b0();
        assert_eq!((b0.blocks.len(), b0.feature_block, b0.channels_at(14)), (16, 14, 192));
        let l0 = EfficientNetConfig::lite0();
        assert_eq!((l0.blocks.len(), l0.feature_block, l0.channels_at(14)), (16, 14, 192));
        let l4 = EfficientNetConfig::lite4();
        assert_eq!((l4.stem_channels, l4.head_channels, l4.blocks[0].input_filters), (32, 1280, 32));
        // The first and last stages keep one block in Lite even when depth scales.
        assert_eq!(
            l4.blocks.iter().filter(|b| b.output_filters == l4.blocks.last().unwrap().output_filters).count(),
            1
        );
    }

    #[test]
    fn padding_follows_the_native_size_parity() {
        assert_eq!(same_padding(456, 3, 2), (0, 1));
        assert_eq!(same_padding(57, 3, 2), (1, 1));
        assert_eq!(same_padding(114, 5, 2), (1, 2));
        assert_eq!(same_padding(29, 5, 2), (2, 2));
        assert_eq!(same_padding(29, 5, 1), (2, 2));
    }
}
