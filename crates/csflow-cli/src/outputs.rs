//! Checks on the files a command writes, before it reads or computes anything.

use std::path::Path;

use anyhow::{bail, Result};

/// Refuses an `output` that is one of the command's `inputs` (flag, path): writing it would replace the
/// input (`export -o model.safetensors` with the model itself, `fit -o` naming the backbone weights).
pub fn check_not_an_input(output: &Path, inputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let Ok(out) = output.canonicalize() else { return Ok(()) };
    for (flag, input) in inputs {
        if input.and_then(|p| p.canonicalize().ok()).is_some_and(|p| p == out) {
            bail!("{}: is also {flag}; writing there would replace it, choose another output", output.display());
        }
    }
    Ok(())
}
