//! Reading an adapter: memory-mapped, validated once at open, tensors sliced lazily.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

use super::config::{AdapterConfig, ModuleConfig};
use super::validate::{config_from_metadata, validate, Reporter, TensorInfo};
use super::{lora_a_name, lora_b_name};
use crate::dtype::Matrix;
use crate::error::{Error, Result};
use crate::orthogonal::random_orthogonal;

/// An open, validated adapter file.
pub struct AdapterFile {
    path: PathBuf,
    mmap: Mmap,
    config: AdapterConfig,
    tensors: BTreeMap<String, (TensorInfo, Range<usize>)>,
}

/// A module's `A`: read from the file or regenerated from the seed.
pub enum FactorA<'a> {
    Stored { info: &'a TensorInfo, bytes: &'a [u8] },
    Generated(Matrix),
}

impl AdapterFile {
    /// Opens and validates `path`; nothing is read beyond the header until asked.
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
        let shown = path.display().to_string();
        let rep = Reporter { path: &shown };
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| rep.err("safetensors", format!("not a valid safetensors file: {e}")))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| rep.err("safetensors", e.to_string()))?;
        let config = config_from_metadata(&rep, metadata.metadata().as_ref())?;
        let data_start = 8 + header_len;
        let tensors: BTreeMap<_, _> = st
            .names()
            .into_iter()
            .map(|name| {
                let info = metadata.info(name).expect("name comes from the same header");
                let (start, end) = info.data_offsets;
                let ti = TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                (name.to_string(), (ti, data_start + start..data_start + end))
            })
            .collect();
        let infos: BTreeMap<String, TensorInfo> = tensors.iter().map(|(k, (i, _))| (k.clone(), i.clone())).collect();
        validate(&rep, &config, &infos)?;
        Ok(AdapterFile {
            path,
            mmap,
            config,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Bytes the same adapter would take with every regenerated `A` stored in
    /// `a_dtype` (a classic LoRA file), counting tensor data only beyond this file.
    pub fn classic_lora_size(&self) -> u64 {
        let c = &self.config;
        let a_bytes: usize = c
            .modules
            .values()
            .filter(|m| !m.a_stored)
            .map(|m| c.module_rank(m) * m.d_in * c.a_dtype.size_bytes())
            .sum();
        self.file_size() + a_bytes as u64
    }

    /// Every tensor name in the file, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Dtype, shape and little-endian bytes of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let (info, range) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::invalid("name", format!("no tensor {name:?} in {}", self.path.display())))?;
        Ok((info, &self.mmap[range.clone()]))
    }

    pub fn module(&self, module: &str) -> Result<&ModuleConfig> {
        self.config
            .modules
            .get(module)
            .ok_or_else(|| Error::invalid("module", format!("no module {module:?} in {}", self.path.display())))
    }

    pub fn lora_b(&self, module: &str) -> Result<(&TensorInfo, &[u8])> {
        self.module(module)?;
        self.tensor(&lora_b_name(module))
    }

    /// The module's `A`: the stored tensor, or the one the generator implies.
    pub fn lora_a(&self, module: &str) -> Result<FactorA<'_>> {
        let m = self.module(module)?;
        if m.a_stored {
            let (info, bytes) = self.tensor(&lora_a_name(module))?;
            Ok(FactorA::Stored { info, bytes })
        } else {
            Ok(FactorA::Generated(random_orthogonal(
                &self.config.a_spec(m),
                self.config.a_dtype,
            )?))
        }
    }
}
