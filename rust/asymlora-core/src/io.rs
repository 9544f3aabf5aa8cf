//! safetensors files: memory-mapped reading, and atomic writing with reproducible bytes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::View;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

/// Dtype and shape of one tensor, wherever it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
}

/// A tensor held in memory, ready to be written.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub info: TensorInfo,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// Checks that `data` holds exactly `shape` elements of `dtype`.
    pub fn new(name: &str, dtype: StDtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
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
    fn dtype(&self) -> StDtype {
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

/// An open safetensors file: header parsed and checked on open, tensors sliced lazily.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, (TensorInfo, Range<usize>)>,
}

impl SafetensorsFile {
    /// Maps `path` and checks its header (offsets, sizes, dtypes) with the safetensors crate.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // Linux opens a directory fine and only the map fails ("No such device").
        if file.metadata().map_err(|e| Error::io(&path, e))?.is_dir() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        // SAFETY: the map is read-only; like every safetensors reader we assume the
        // file is not truncated by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |e: safetensors::SafeTensorError| Error::safetensors(&path, e.to_string());
        let st = SafeTensors::deserialize(&mmap).map_err(bad)?;
        let (header_len, header) = SafeTensors::read_metadata(&mmap).map_err(bad)?;
        let data_start = 8 + header_len;
        let tensors = st
            .names()
            .into_iter()
            .map(|name| {
                let info = header.info(name).expect("name comes from the same header");
                let (start, end) = info.data_offsets;
                let ti = TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                (name.to_string(), (ti, data_start + start..data_start + end))
            })
            .collect();
        let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(SafetensorsFile {
            path,
            mmap,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Dtype and shape of every tensor, by name.
    pub fn infos(&self) -> BTreeMap<String, TensorInfo> {
        self.tensors.iter().map(|(k, (i, _))| (k.clone(), i.clone())).collect()
    }

    /// Dtype, shape and little-endian bytes of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let (info, range) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::invalid("name", format!("no tensor {name:?} in {}", self.path.display())))?;
        Ok((info, &self.mmap[range.clone()]))
    }
}

/// Writes `tensors` and `metadata` as a safetensors file at `path`, atomically.
///
/// The bytes depend only on the content (header keys sorted), and a temporary file
/// in the destination directory is renamed over `path` at the end, so a failure
/// never leaves a partial file under the final name.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::serialize(tensors.iter(), metadata)
        .map_err(|e| Error::safetensors(path, format!("cannot serialise: {e}")))?;
    let bytes = with_sorted_header(bytes).map_err(|e| Error::safetensors(path, e))?;

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".asymlora-").suffix(".tmp");
    // tempfile creates 0600 files; our outputs are meant to be shared like any other.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(&bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Rewrites the `__metadata__` map of a serialised safetensors file with sorted keys.
///
/// safetensors keeps `__metadata__` in a `HashMap` and writes it in that map's
/// per-process random order, so the same content would get different bytes (and
/// hashes) from run to run. The crate writes `{"__metadata__":{...},` first and the
/// tensor entries in a fixed order; sorting the map's keys changes no token, so the
/// header keeps its length and every offset stays valid. Everything else is left as
/// the crate wrote it, so files match those of other safetensors writers.
fn with_sorted_header(mut bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let len_bytes: [u8; 8] = bytes[..8].try_into().expect("serialised file has a header length");
    let header_len = u64::from_le_bytes(len_bytes) as usize;
    let header = &bytes[8..8 + header_len];
    if !header.starts_with(PREFIX) {
        return Ok(bytes); // no metadata: nothing depends on a map order
    }
    let parsed: HashMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("cannot re-read the header: {e}"))?;
    let metadata: BTreeMap<String, String> = serde_json::from_value(parsed["__metadata__"].clone())
        .map_err(|e| format!("cannot re-read the metadata: {e}"))?;
    let sorted = serde_json::to_vec(&metadata).map_err(|e| format!("cannot write the metadata: {e}"))?;
    let (start, end) = (8 + PREFIX.len(), 8 + PREFIX.len() + sorted.len());
    if end >= 8 + header_len || !matches!(bytes[end], b',' | b'}') {
        return Err("unexpected header layout from the safetensors crate".into());
    }
    bytes[start..end].copy_from_slice(&sorted);
    Ok(bytes)
}
