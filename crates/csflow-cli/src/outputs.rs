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

/// `path` made absolute through its deepest existing ancestor's canonical form (symbolic links resolved),
/// for comparing an output that may not exist yet with existing folders.
pub fn canonical_lenient(path: &Path) -> Option<std::path::PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name()?.to_owned());
        existing = existing.parent()?;
    }
    let mut out = existing.canonicalize().ok()?;
    out.extend(rest.iter().rev());
    Some(out)
}

/// Refuses an output folder inside one of `data`'s `parts` (`test`, `train`, ...; `""` for `data` itself): a
/// folder of results there would be read as data by the next run (an empty `test/results` is taken for a
/// defect type).
pub fn check_outside_data(out: &Path, data: &Path, parts: &[&str]) -> Result<()> {
    let (Some(out_c), Ok(data_c)) = (canonical_lenient(out), data.canonicalize()) else { return Ok(()) };
    if let Some(part) = parts.iter().find(|p| out_c.starts_with(data_c.join(p))) {
        let inside =
            if part.is_empty() { "the input folder".to_string() } else { format!("the data set's {part}/ folder") };
        bail!(
            "{}: is inside {inside}, where the next run would read it as data; choose a folder outside {}",
            out.display(),
            data.display()
        );
    }
    Ok(())
}
