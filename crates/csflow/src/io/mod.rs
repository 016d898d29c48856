//! Files csflow reads and writes (SPEC 2). Every write is atomic: a temporary file in the same folder,
//! then a rename, so a crash never leaves a half-written model or cache.

mod features_file;
mod images;
mod model_file;
mod pth;
mod st;

pub use features_file::{load_features, save_features, FeatureSet};
pub use images::{
    check_input_size, decode_rgb, decode_rgb_within, load_rgb, preprocess, pyramid, resize_rgb, to_normalized_tensor,
    IMAGENET_MEAN, IMAGENET_STD, MAX_PIXELS,
};
pub use model_file::{
    load_model, save_model, BackboneMeta, ModelFile, ModelMeta, ScoreStats, BACKBONE_PREFIX, FORMAT_VERSION,
};
pub use pth::read_pth;
pub use st::{read_safetensors, write_safetensors};

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Refuses weights or features of `path` that hold NaN or infinity, naming the first such tensor: they give
/// wrong scores rather than errors (the backbone's ReLU6 turns NaN into 0).
pub(crate) fn check_finite<'a, N: std::fmt::Display>(
    path: &Path,
    tensors: impl IntoIterator<Item = (N, &'a candle_core::Tensor)>,
) -> Result<()> {
    for (name, t) in tensors {
        let v: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if !v.iter().all(|x| x.is_finite()) {
            return Err(Error::format(path, format!("tensor `{name}` holds NaN or infinite values")));
        }
    }
    Ok(())
}

/// Removes what [`atomic_write`]s of `path` by processes no longer running left behind (a run stopped by a
/// signal mid-write leaves its temporary file: hundreds of MB for a paper-size checkpoint). Best effort; on
/// systems without `/proc` nothing is removed.
pub fn remove_stale_temporaries(path: &Path) {
    let (Some(name), dir) = (path.file_name(), path.parent().filter(|d| !d.as_os_str().is_empty())) else {
        return;
    };
    let dir = dir.unwrap_or(Path::new("."));
    if !Path::new("/proc/self").exists() {
        return;
    }
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".tmp-");
    let prefix = prefix.as_encoded_bytes().to_vec();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.as_encoded_bytes().strip_prefix(prefix.as_slice()) else { continue };
        // `<pid>-<n>`: the writer's process id.
        let pid = rest.split(|&b| b == b'-').next().and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|&p| p != std::process::id()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename. A file replaced keeps
/// its permissions, a symbolic link keeps pointing where it did (its target is rewritten), and a read-only
/// file is refused, not replaced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let resolved;
    let path = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            resolved = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
            resolved.as_path()
        }
        _ => path,
    };
    let replaced = std::fs::metadata(path).ok().filter(|m| m.is_file());
    if replaced.as_ref().is_some_and(|m| m.permissions().readonly()) {
        return Err(Error::format(path, "the file is read-only; not replaced"));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| Error::Invalid(format!("{}: not a file name", path.display())))?;
    // Unique to this write: two threads writing the same path each rename a whole file of their own.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{}", std::process::id(), WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let tmp = dir.join(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if let Some(m) = &replaced {
            f.set_permissions(m.permissions())?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replaced file keeps its permissions; a link's target is rewritten, the link kept; a read-only file
    /// is refused and kept.
    #[cfg(unix)]
    #[test]
    fn replacing_keeps_permissions_links_and_read_only_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        std::fs::write(&model, b"old").unwrap();
        std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o640)).unwrap();
        atomic_write(&model, b"new").unwrap();
        assert_eq!(std::fs::read(&model).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&model).unwrap().permissions().mode() & 0o777, 0o640);
        let link = dir.path().join("link.safetensors");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        atomic_write(&link, b"through the link").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&model).unwrap(), b"through the link");
        std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = atomic_write(&model, b"refused").unwrap_err().to_string();
        assert!(err.contains("read-only") && err.contains("m.safetensors"), "{err}");
        assert_eq!(std::fs::read(&model).unwrap(), b"through the link");
    }

    /// A dead writer's temporary file of the path goes; a live process's, and other paths', stay.
    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        // Above Linux's largest process id (2^22): no such process.
        let dead = dir.path().join(".m.safetensors.tmp-99999999-3");
        let ours = dir.path().join(format!(".m.safetensors.tmp-{}-999999", std::process::id()));
        let other = dir.path().join(".n.safetensors.tmp-99999999-0");
        for p in [&dead, &ours, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        atomic_write(&model, b"whole").unwrap();
        remove_stale_temporaries(&model);
        assert_eq!(dead.exists(), !Path::new("/proc/self").exists());
        assert!(ours.exists() && other.exists() && model.exists());
    }
}
