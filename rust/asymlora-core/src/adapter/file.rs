//! Reading an adapter: memory-mapped, validated once at open, tensors sliced lazily.

use std::path::Path;

use super::config::{AdapterConfig, ModuleConfig};
use super::validate::{config_from_metadata, validate, Reporter};
use super::{lora_a_name, lora_b_name};
use crate::dtype::Matrix;
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, TensorInfo};
use crate::orthogonal::{random_orthogonal, random_orthogonal_many};

/// An open, validated adapter file.
pub struct AdapterFile {
    file: SafetensorsFile,
    config: AdapterConfig,
}

/// A module's `A`: read from the file or regenerated from the seed.
pub enum FactorA<'a> {
    Stored { info: &'a TensorInfo, bytes: &'a [u8] },
    Generated(Matrix),
}

impl AdapterFile {
    /// Opens and validates `path`; nothing is read beyond the header until asked.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let rep = Reporter { path: &shown };
        let file = SafetensorsFile::open(path).map_err(|e| match e {
            Error::Safetensors { message, .. } => {
                rep.err("safetensors", format!("not a valid safetensors file: {message}"))
            }
            other => other,
        })?;
        let config = config_from_metadata(&rep, file.metadata())?;
        validate(&rep, &config, &file.infos())?;
        Ok(AdapterFile { file, config })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The underlying mapped safetensors file.
    pub fn safetensors(&self) -> &SafetensorsFile {
        &self.file
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    pub fn file_size(&self) -> u64 {
        self.file.file_size()
    }

    /// Bytes the same adapter would take with every regenerated `A` stored in
    /// `a_dtype` (a classic LoRA file), counting tensor data only beyond this file.
    pub fn classic_lora_size(&self) -> u64 {
        let c = &self.config;
        let a_bytes: usize = c
            .modules
            .values()
            .filter(|m| !m.a_stored)
            .map(|m| m.blocks() * c.module_rank(m) * m.d_in * c.a_dtype.size_bytes())
            .sum();
        self.file_size() + a_bytes as u64
    }

    /// Every tensor name in the file, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.file.tensor_names()
    }

    /// Dtype, shape and little-endian bytes of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        self.file.tensor(name)
    }

    pub fn module(&self, module: &str) -> Result<&ModuleConfig> {
        self.config
            .modules
            .get(module)
            .ok_or_else(|| Error::invalid("module", format!("no module {module:?} in {}", self.path().display())))
    }

    pub fn lora_b(&self, module: &str) -> Result<(&TensorInfo, &[u8])> {
        self.module(module)?;
        self.tensor(&lora_b_name(module))
    }

    /// The module's `A` (`[E, r, d_in]` for a 3-D parameter, else `r x d_in`): the
    /// stored tensor, or the one the generator implies (expert `e` on stream `stream + e`).
    pub fn lora_a(&self, module: &str) -> Result<FactorA<'_>> {
        let m = self.module(module)?;
        if m.a_stored {
            let (info, bytes) = self.tensor(&lora_a_name(module))?;
            return Ok(FactorA::Stored { info, bytes });
        }
        let specs: Vec<_> = (0..m.blocks()).map(|e| self.config.block_a_spec(m, e)).collect();
        let blocks = random_orthogonal_many(&specs, self.config.a_dtype)?;
        Ok(FactorA::Generated(Matrix::concat(blocks)))
    }

    /// The regenerated `A` (r x d_in) of expert `block` of a module whose `A` is not stored.
    pub fn generated_a_block(&self, module: &str, block: usize) -> Result<Matrix> {
        let m = self.module(module)?;
        random_orthogonal(&self.config.block_a_spec(m, block), self.config.a_dtype)
    }
}
