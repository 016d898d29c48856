use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::atomic_write;
use crate::{Error, Result};

/// Reads every tensor of a safetensors file as f32 (f16, bf16 and f64 are converted) plus its metadata.
pub fn read_safetensors(path: &Path) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::format(path, m);
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("unreadable header ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let t = match view.dtype() {
            Dtype::F32 => Tensor::from_raw_buffer(data, DType::F32, &shape, &Device::Cpu)?,
            Dtype::F16 => Tensor::from_raw_buffer(data, DType::F16, &shape, &Device::Cpu)?.to_dtype(DType::F32)?,
            Dtype::BF16 => Tensor::from_raw_buffer(data, DType::BF16, &shape, &Device::Cpu)?.to_dtype(DType::F32)?,
            Dtype::F64 => Tensor::from_raw_buffer(data, DType::F64, &shape, &Device::Cpu)?.to_dtype(DType::F32)?,
            d => return Err(bad(format!("tensor `{name}` has dtype {d:?}; csflow reads floating-point tensors"))),
        };
        out.insert(name, t);
    }
    Ok((out, meta))
}

/// Writes f32 tensors and string metadata as one safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>, meta: HashMap<String, String>) -> Result<()> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        buffers.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| {
            Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Invalid(e.to_string()))?))
        })
        .collect::<Result<_>>()?;
    let meta = if meta.is_empty() { None } else { Some(meta) };
    let bytes = safetensors::tensor::serialize(views, meta).map_err(|e| Error::format(path, e.to_string()))?;
    atomic_write(path, &bytes)
}
