//! PyTorch checkpoint reader against the fixtures of reference/make_pth_fixtures.py: both file formats,
//! pickle protocols 2 and 4, training-checkpoint dicts, nested dicts, and refusals of malicious or damaged
//! files (errors that name the file, never panics).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use csflow::io::{read_pth, read_safetensors};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth").join(name)
}

/// Expected tensors: the state dict's (`group` ""), or another file's (names `group:name`, group removed).
fn expected(group: &str) -> BTreeMap<String, Tensor> {
    let (all, _) = read_safetensors(&fixture("expected.safetensors")).expect("expected.safetensors");
    all.into_iter()
        .filter_map(|(k, v)| match k.split_once(':') {
            Some((g, n)) if g == group => Some((n.to_string(), v)),
            None if group.is_empty() => Some((k, v)),
            _ => None,
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn assert_same(file: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    let names = |m: &BTreeMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{file}: tensor names");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dims(), w.dims(), "{file}: shape of {name}");
        assert_eq!(g.dtype(), candle_core::DType::F32, "{file}: dtype of {name}");
        assert!(g.is_contiguous(), "{file}: {name} is not contiguous");
        assert_eq!(bits(g), bits(w), "{file}: values of {name}");
    }
}

fn read_ok(file: &str) -> BTreeMap<String, Tensor> {
    read_pth(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn read_err(path: &Path) -> String {
    match read_pth(path) {
        Ok(t) => panic!("{}: read {} tensors, expected an error", path.display(), t.len()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
            msg
        }
    }
}

#[test]
fn state_dict_in_every_format_matches_pytorch() {
    let want = expected("");
    assert!(want.contains_key("1.num_batches_tracked") && want.contains_key("extra.view"));
    for file in ["state_zip.pth", "state_legacy.pth", "state_proto4.pth", "state_deflate.pth"] {
        assert_same(file, &read_ok(file), &want);
    }
}

#[test]
fn training_checkpoints_yield_their_state_dict() {
    let want = expected("");
    // {"state_dict": sd, "epoch": 3, "optimizer": {...tensors...}}: only the state dict's tensors.
    assert_same("checkpoint_zip.pth", &read_ok("checkpoint_zip.pth"), &want);
    // {"model": sd, "epoch": 3, "best": 0.5}, legacy format.
    assert_same("checkpoint_model_legacy.pth", &read_ok("checkpoint_model_legacy.pth"), &want);
}

#[test]
fn nested_dicts_are_flattened_with_dots() {
    let got = read_ok("nested_zip.pth");
    assert_same("nested_zip.pth", &got, &expected("nested"));
    assert!(got.contains_key("backbone.conv.weight"));
}

#[test]
fn strides_offsets_and_shared_storages_are_honoured() {
    let got = read_ok("state_legacy.pth");
    let v = |n: &str| got[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // base = arange(24) * 0.5 - 3; view = base[6:18].view(3, 4) shares its storage from offset 6.
    assert_eq!(v("extra.view"), (6..18).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<_>>());
    assert_eq!(got["extra.view"].dims(), [3, 4]);
    assert_eq!(got["extra.transposed"].dims(), [5, 3]);
    assert_eq!(got["extra.permuted"].dims(), [2, 4, 5, 3]);
    assert_eq!(got["extra.scalar"].dims(), [0usize; 0]);
    assert_eq!(got["extra.empty"].dims(), [0, 3]);
    assert_eq!(v("extra.half")[..3], [1.0, -2.5, 65504.0]);
}

#[test]
fn legacy_storage_views_are_honoured() {
    // Old torch wrote storage views as persistent ids with (view_key, offset, length) metadata.
    assert_same("view_legacy.pth", &read_ok("view_legacy.pth"), &expected("view"));
}

#[test]
fn malicious_pickles_are_refused_by_name() {
    let msg = read_err(&fixture("malicious_zip.pth"));
    assert!(msg.contains("os.system") && msg.contains("refused"), "{msg}");
    let msg = read_err(&fixture("malicious_legacy.pth"));
    assert!(msg.contains("builtins.eval") && msg.contains("refused"), "{msg}");
}

#[test]
fn tensors_reaching_past_their_storage_are_refused() {
    let msg = read_err(&fixture("out_of_bounds_legacy.pth"));
    assert!(msg.contains("weight") && msg.contains("past the end"), "{msg}");
}

#[test]
fn truncated_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["state_zip.pth", "state_legacy.pth", "checkpoint_model_legacy.pth"] {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let path = dir.path().join(format!("truncated_{file}"));
        let step = if file.ends_with("zip.pth") { 7 } else { 1 };
        for len in (0..bytes.len()).step_by(step) {
            std::fs::write(&path, &bytes[..len]).unwrap();
            read_err(&path);
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Every byte of a legacy file flipped in turn: pickle, keys and storage sizes all get damaged.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.pth");
    let bytes = std::fs::read(fixture("state_legacy.pth")).unwrap();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            std::fs::write(&path, &b).unwrap();
            if let Err(e) = read_pth(&path) {
                assert!(e.to_string().contains("corrupt.pth"), "{e}");
            }
        }
    }
}

#[test]
fn other_files_are_not_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.pth");
    std::fs::write(&path, "hello").unwrap();
    assert!(read_err(&path).contains("not a PyTorch checkpoint"));
    // A plain pickle of a dict, without torch's header.
    std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
    assert!(read_err(&path).contains("not a PyTorch checkpoint"));
    assert!(matches!(read_pth(&dir.path().join("missing.pth")), Err(csflow::Error::Io { .. })));
}
