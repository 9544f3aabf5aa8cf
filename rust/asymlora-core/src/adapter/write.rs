//! Writing an adapter: validate everything first, then write a temporary file in
//! the destination directory and rename it, so a failure never leaves a partial file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::View;

use super::config::{AdapterConfig, FORMAT_NAME, FORMAT_VERSION, META_CONFIG, META_FORMAT, META_VERSION};
use super::validate::{validate, Reporter, TensorInfo};
use crate::error::{Error, Result};

/// A tensor held in memory, ready to be written.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub info: TensorInfo,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// Checks that `data` holds exactly `shape` elements of `dtype`.
    pub fn new(name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if data.len() != expected {
            return Err(Error::invalid(
                "tensors",
                format!(
                    "tensor {name:?}: {} bytes for shape {shape:?} of {dtype:?}, expected {expected}",
                    data.len()
                ),
            ));
        }
        Ok(OwnedTensor {
            info: TensorInfo { dtype, shape },
            data,
        })
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.info.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.info.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Rewrites the JSON header of a serialised safetensors file with its keys sorted.
///
/// safetensors keeps `__metadata__` in a `HashMap` and writes it in that map's
/// per-process random order, so the same adapter would get different bytes (and
/// hashes) from run to run. Sorting changes no token, so the header keeps its length
/// and padding, and every offset stays valid.
fn with_sorted_header(mut bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let len_bytes: [u8; 8] = bytes[..8].try_into().expect("serialised file has a header length");
    let header_len = u64::from_le_bytes(len_bytes) as usize;
    let header = &bytes[8..8 + header_len];
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("cannot re-read the header: {e}"))?;
    let sorted: BTreeMap<&String, serde_json::Value> = parsed.iter().map(|(k, v)| (k, sort_keys(v))).collect();
    let mut text = serde_json::to_vec(&sorted).map_err(|e| format!("cannot write the header: {e}"))?;
    if text.len() > header_len {
        return Err(format!("sorted header grew from {header_len} to {} bytes", text.len()));
    }
    text.resize(header_len, b' '); // safetensors pads the header with spaces
    bytes[8..8 + header_len].copy_from_slice(&text);
    Ok(bytes)
}

fn sort_keys(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&String, serde_json::Value> = map.iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::to_value(sorted).expect("a map of JSON values serialises")
        }
        other => other.clone(),
    }
}

/// Validates `config` against `tensors` and writes the adapter to `path` atomically.
pub fn write_adapter(
    path: impl AsRef<Path>,
    config: &AdapterConfig,
    tensors: &BTreeMap<String, OwnedTensor>,
) -> Result<()> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let rep = Reporter { path: &shown };
    let infos: BTreeMap<String, TensorInfo> = tensors.iter().map(|(k, t)| (k.clone(), t.info.clone())).collect();
    validate(&rep, config, &infos)?;

    let metadata: HashMap<String, String> = [
        (META_FORMAT.to_string(), FORMAT_NAME.to_string()),
        (META_VERSION.to_string(), FORMAT_VERSION.to_string()),
        (META_CONFIG.to_string(), config.to_json()),
    ]
    .into();
    let bytes = safetensors::serialize(tensors.iter(), Some(metadata))
        .map_err(|e| rep.err("safetensors", format!("cannot serialise: {e}")))?;
    let bytes = with_sorted_header(bytes).map_err(|e| rep.err("safetensors", e))?;

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".asymlora-").suffix(".tmp");
    // tempfile creates 0600 files; an adapter is meant to be shared like any output.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(&bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
