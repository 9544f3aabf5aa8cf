//! Writing an adapter: validate everything first, then write a temporary file in
//! the destination directory and rename it, so a failure never leaves a partial file.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{AdapterConfig, FORMAT_NAME, FORMAT_VERSION, META_CONFIG, META_FORMAT, META_VERSION};
use super::validate::{validate, Reporter};
use crate::error::Result;
use crate::io::{write_safetensors, OwnedTensor, TensorInfo};

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

    let metadata: BTreeMap<String, String> = [
        (META_FORMAT.to_string(), FORMAT_NAME.to_string()),
        (META_VERSION.to_string(), FORMAT_VERSION.to_string()),
        (META_CONFIG.to_string(), config.to_json()),
    ]
    .into();
    write_safetensors(path, tensors, &metadata)
}
