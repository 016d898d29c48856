//! Data set layouts (SPEC 3): the MVTec AD layout and the folder layout, read into lists of samples.

use std::path::{Path, PathBuf};

use crate::extract::is_image;
use crate::{Error, Result};

/// Name of the good class, as MVTec AD spells its folders.
pub const GOOD: &str = "good";

/// One image of a data set and what is known about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    /// `good`, or the defect type (the MVTec `test/<defect>` folder name; `defect` in the folder layout).
    pub kind: String,
    /// Ground-truth mask of the defect, when the layout has one.
    pub mask: Option<PathBuf>,
}

impl Sample {
    pub fn is_good(&self) -> bool {
        self.kind == GOOD
    }

    /// 0 = good, 1 = defect.
    pub fn label(&self) -> u8 {
        u8::from(!self.is_good())
    }
}

/// Training images (good only) and labelled test images.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
}

impl Dataset {
    /// Reads `dir` as an MVTec AD category when it has `train/good`, otherwise as one folder of good images
    /// (all used for training, no test set).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(dir, "not a folder"));
        }
        if dir.join("train").join(GOOD).is_dir() {
            Self::mvtec(dir)
        } else if dir.join("train").is_dir() || dir.join("test").is_dir() {
            Err(Error::format(
                dir,
                "looks like an MVTec AD category but has no `train/good` folder (expected train/good, test/good, \
                 test/<defect>, ground_truth/<defect>/<name>_mask.png)",
            ))
        } else {
            // A plain folder is taken for good images only: refuse what is clearly not that.
            if dir.join("ground_truth").is_dir() {
                return Err(Error::format(dir, "has a ground_truth folder: pass the MVTec AD category folder itself"));
            }
            if let Some(cat) = sorted_entries(dir)?.into_iter().find(|p| p.join("train").join(GOOD).is_dir()) {
                return Err(Error::format(
                    dir,
                    format!("holds data sets (e.g. {}): pass one category folder", cat.display()),
                ));
            }
            let subdirs: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect();
            if dir.join(GOOD).is_dir() && subdirs.len() > 1 {
                return Err(Error::format(
                    dir,
                    "has `good` beside other folders, like an MVTec test folder of defects: pass the category \
                     folder, or a folder of good images only",
                ));
            }
            let train = good_samples(&images_in(dir, true)?);
            Ok(Self { train, test: Vec::new() })
        }
    }

    /// An MVTec AD category: `train/good`, `test/good`, `test/<defect>`, `ground_truth/<defect>/<name>_mask.png`.
    /// A defect image without its mask is kept (pixel metrics then skip the data set and say why).
    pub fn mvtec(root: &Path) -> Result<Self> {
        let train = good_samples(&images_in(&root.join("train").join(GOOD), false)?);
        let test_dir = root.join("test");
        let mut test = Vec::new();
        if test_dir.is_dir() {
            for kind_dir in sorted_entries(&test_dir)?.into_iter().filter(|p| p.is_dir()) {
                let kind = kind_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let gt = root.join("ground_truth").join(&kind);
                for path in images_in(&kind_dir, false)? {
                    let mask = (kind != GOOD).then(|| mask_for(&gt, &path)).flatten();
                    test.push(Sample { path, kind: kind.clone(), mask });
                }
            }
        }
        Ok(Self { train, test })
    }

    /// The folder layout: good images, defective images and optionally a folder of their masks (named as the
    /// image, or `<name>_mask`, any image extension).
    pub fn folders(normal: &Path, abnormal: Option<&Path>, masks: Option<&Path>) -> Result<Self> {
        let good = good_samples(&images_in(normal, true)?);
        let mut test = Vec::new();
        if let Some(dir) = abnormal {
            let mut owner: std::collections::HashMap<PathBuf, PathBuf> = Default::default();
            for path in images_in(dir, true)? {
                // A mask in the mirrored subfolder first, then directly in the mask folder.
                let sub = path.parent().and_then(|p| p.strip_prefix(dir).ok()).unwrap_or(Path::new(""));
                let mask = masks.and_then(|m| mask_for(&m.join(sub), &path).or_else(|| mask_for(m, &path)));
                if let Some(m) = &mask {
                    if let Some(other) = owner.insert(m.clone(), path.clone()) {
                        return Err(Error::format(
                            m,
                            format!(
                                "this mask would serve both {} and {}: mirror the image subfolders in the mask folder",
                                other.display(),
                                path.display()
                            ),
                        ));
                    }
                }
                test.push(Sample { path, kind: "defect".into(), mask });
            }
        }
        Ok(Self { train: good, test })
    }

    /// Defect types of the test set, sorted, without `good`.
    pub fn defect_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.test.iter().filter(|s| !s.is_good()).map(|s| s.kind.clone()).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

/// Splits `0..n` into training and validation indices (both sorted): a seeded random `fraction` of the
/// samples (rounded, at least one when `fraction > 0` and `n >= 2`) is held out for validation.
pub fn validation_split(n: usize, fraction: f64, seed: u32) -> (Vec<usize>, Vec<usize>) {
    let m = if fraction <= 0.0 || n < 2 { 0 } else { ((n as f64 * fraction).round() as usize).clamp(1, n - 1) };
    let order = crate::flow::permutation::Mt19937::new(seed ^ 0x7a11_da7e).permutation(n);
    let mut val: Vec<usize> = order[..m].to_vec();
    let mut train: Vec<usize> = order[m..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

fn good_samples(paths: &[PathBuf]) -> Vec<Sample> {
    paths.iter().map(|p| Sample { path: p.clone(), kind: GOOD.into(), mask: None }).collect()
}

/// The entries of `dir`, sorted, hidden ones (names starting with `.`) left out: macOS's `._000.png` beside
/// each image copied from a Mac is no image, and `.ipynb_checkpoints` is no defect kind.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut entries = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        if !e.file_name().as_encoded_bytes().starts_with(b".") {
            entries.push(e.path());
        }
    }
    entries.sort();
    Ok(entries)
}

/// Image files in `dir` (sorted; with `recursive`, also in its subfolders, depth-first); an empty result is
/// an error naming the folder.
pub fn images_in(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    fn walk(d: &Path, recursive: bool, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        // Symbolic links can loop; 32 levels is far beyond any real data set.
        if depth > 32 {
            return Err(Error::format(d, "folders nested more than 32 deep (a symbolic link loop?)"));
        }
        for p in sorted_entries(d)? {
            if p.is_dir() {
                if recursive {
                    walk(&p, recursive, depth + 1, out)?;
                }
            } else if is_image(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    if !dir.is_dir() {
        return Err(Error::format(dir, "folder not found"));
    }
    let mut out = Vec::new();
    walk(dir, recursive, 0, &mut out)?;
    if out.is_empty() {
        return Err(Error::format(dir, "no images found (png, jpg, jpeg, bmp, tif, tiff, webp)"));
    }
    Ok(out)
}

/// The mask of `image` in `dir`: `<stem>_mask.<ext>` (MVTec) or `<stem>.<ext>`, any image extension.
fn mask_for(dir: &Path, image: &Path) -> Option<PathBuf> {
    let stem = image.file_stem()?.to_string_lossy().into_owned();
    let exts = ["png", "bmp", "tif", "tiff", "jpg", "jpeg", "webp"];
    [format!("{stem}_mask"), stem]
        .iter()
        .flat_map(|n| exts.iter().map(move |e| dir.join(format!("{n}.{e}"))))
        .find(|p| p.is_file())
}

/// Loads a ground-truth mask as `height x width` booleans (nonzero = defect), resized with nearest
/// neighbour when its size differs from the image's.
pub fn load_mask(path: &Path, height: usize, width: usize) -> Result<Vec<u8>> {
    // As 16-bit: a 16-bit mask of 0 and 1 (Pillow reads it so) would lose its 1s in 8 bits.
    let img = image::open(path).map_err(|e| Error::format(path, format!("cannot read the mask ({e})")))?.to_luma16();
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    if w0 == 0 || h0 == 0 {
        return Err(Error::format(path, "the mask is empty"));
    }
    let mut out = vec![0u8; height * width];
    for y in 0..height {
        let sy = ((y as f64 + 0.5) * h0 as f64 / height as f64) as usize;
        for x in 0..width {
            let sx = ((x as f64 + 0.5) * w0 as f64 / width as f64) as usize;
            out[y * width + x] = u8::from(img.get_pixel(sx.min(w0 - 1) as u32, sy.min(h0 - 1) as u32)[0] > 0);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch_png(path: &Path, w: u32, h: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(w, h, image::Luma([value])).save(path).unwrap();
    }

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let (t, v) = validation_split(20, 0.1, 0);
        assert_eq!((t.len(), v.len()), (18, 2));
        let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(validation_split(20, 0.1, 0), (t, v.clone()));
        assert_ne!(validation_split(20, 0.1, 1).1, v);
        assert_eq!(validation_split(5, 0.01, 0).1.len(), 1, "at least one");
        assert_eq!(validation_split(5, 0.0, 0).1.len(), 0);
        assert_eq!(validation_split(1, 0.5, 0).1.len(), 0, "never the only sample");
    }

    #[test]
    fn mvtec_layout_with_masks() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        touch_png(&r.join("train/good/000.png"), 8, 8, 100);
        touch_png(&r.join("train/good/001.png"), 8, 8, 100);
        touch_png(&r.join("test/good/000.png"), 8, 8, 100);
        touch_png(&r.join("test/scratch/000.png"), 8, 8, 100);
        touch_png(&r.join("test/scratch/001.png"), 8, 8, 100);
        touch_png(&r.join("ground_truth/scratch/000_mask.png"), 4, 4, 255);
        // Hidden entries are left out: macOS's resource forks beside copied images, a notebook's checkpoints.
        std::fs::write(r.join("train/good/._000.png"), b"\0\x05\x16\x07 AppleDouble").unwrap();
        std::fs::write(r.join("test/scratch/._001.png"), b"\0\x05\x16\x07 AppleDouble").unwrap();
        touch_png(&r.join("test/.ipynb_checkpoints/000.png"), 8, 8, 100);
        let ds = Dataset::open(r).unwrap();
        assert_eq!(ds.train.len(), 2);
        assert_eq!(ds.test.len(), 3);
        assert_eq!(ds.test[0].kind, "good");
        assert_eq!(ds.test[1].mask.as_deref(), Some(r.join("ground_truth/scratch/000_mask.png").as_path()));
        assert_eq!(ds.test[2].mask, None, "001 has no mask");
        assert_eq!(ds.defect_kinds(), vec!["scratch".to_string()]);
        assert_eq!(ds.test.iter().map(Sample::label).collect::<Vec<_>>(), vec![0, 1, 1]);
    }

    #[test]
    fn plain_folder_is_all_training() {
        let d = tempfile::tempdir().unwrap();
        touch_png(&d.path().join("a/x.png"), 4, 4, 1);
        touch_png(&d.path().join("y.png"), 4, 4, 1);
        let ds = Dataset::open(d.path()).unwrap();
        assert_eq!(ds.train.len(), 2);
        assert!(ds.test.is_empty());
    }

    #[test]
    fn broken_layouts_name_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("test/good")).unwrap();
        let e = Dataset::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("train/good"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = Dataset::open(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no images found") && e.contains(&empty.path().display().to_string()), "{e}");
        let e = Dataset::open(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
        // A folder of categories is not a folder of good images.
        let all = tempfile::tempdir().unwrap();
        touch_png(&all.path().join("bottle/train/good/000.png"), 4, 4, 1);
        let e = Dataset::open(all.path()).unwrap_err().to_string();
        assert!(e.contains("pass one category") && e.contains("bottle"), "{e}");
    }

    #[test]
    fn folder_layout_finds_masks_by_name() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        touch_png(&r.join("ok/a.png"), 4, 4, 1);
        touch_png(&r.join("bad/b.png"), 4, 4, 1);
        touch_png(&r.join("bad/c.jpg"), 4, 4, 1);
        touch_png(&r.join("masks/b.png"), 4, 4, 255);
        touch_png(&r.join("masks/c_mask.png"), 4, 4, 255);
        let ds = Dataset::folders(&r.join("ok"), Some(&r.join("bad")), Some(&r.join("masks"))).unwrap();
        assert_eq!(ds.test.len(), 2);
        assert_eq!(ds.test[0].mask.as_deref(), Some(r.join("masks/b.png").as_path()));
        assert_eq!(ds.test[1].mask.as_deref(), Some(r.join("masks/c_mask.png").as_path()));
        // Same names in two subfolders: masks from mirrored subfolders, or a clear error when they would share one.
        touch_png(&r.join("bad2/x/001.png"), 4, 4, 1);
        touch_png(&r.join("bad2/y/001.png"), 4, 4, 1);
        touch_png(&r.join("masks2/001.png"), 4, 4, 255);
        let e = Dataset::folders(&r.join("ok"), Some(&r.join("bad2")), Some(&r.join("masks2"))).unwrap_err();
        assert!(e.to_string().contains("would serve both"), "{e}");
        touch_png(&r.join("masks3/x/001.png"), 4, 4, 255);
        touch_png(&r.join("masks3/y/001_mask.png"), 4, 4, 255);
        let ds = Dataset::folders(&r.join("ok"), Some(&r.join("bad2")), Some(&r.join("masks3"))).unwrap();
        assert_eq!(ds.test[0].mask.as_deref(), Some(r.join("masks3/x/001.png").as_path()));
        assert_eq!(ds.test[1].mask.as_deref(), Some(r.join("masks3/y/001_mask.png").as_path()));
    }

    #[test]
    fn masks_resize_with_nearest_neighbour() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.png");
        // 2x2 mask with the top-right pixel set, read at 4x4: the top-right quadrant is set.
        let mut m = image::GrayImage::new(2, 2);
        m.put_pixel(1, 0, image::Luma([255]));
        m.save(&p).unwrap();
        let got = load_mask(&p, 4, 4).unwrap();
        let want = [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(got, want);
        // Nonzero is defect in any depth: 16-bit masks of 0 and 1 (in 8 bits the 1s became 0), 8-bit value 1,
        // and a faint blue in an RGB mask.
        let mut m16 = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::new(2, 2);
        m16.put_pixel(1, 0, image::Luma([1]));
        m16.save(&p).unwrap();
        assert_eq!(load_mask(&p, 4, 4).unwrap(), want);
        let mut m8 = image::GrayImage::new(2, 2);
        m8.put_pixel(1, 0, image::Luma([1]));
        m8.save(&p).unwrap();
        assert_eq!(load_mask(&p, 4, 4).unwrap(), want);
        let mut rgb = image::RgbImage::new(2, 2);
        rgb.put_pixel(1, 0, image::Rgb([0, 0, 1]));
        rgb.save(&p).unwrap();
        assert_eq!(load_mask(&p, 4, 4).unwrap(), want);
    }
}
