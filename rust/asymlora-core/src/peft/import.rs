//! A PEFT LoRA directory converted into an asymlora adapter file (every `A` stored).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::reader::{is_integer, peft_dir, PeftAdapter};
use crate::adapter::{lora_a_name, lora_b_name, write_adapter, AdapterConfig, ModuleConfig, ModuleKind};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::OwnedTensor;
use crate::orthogonal::Generator;

/// What an import did.
#[derive(Clone, Debug, Default)]
pub struct ImportReport {
    pub out: PathBuf,
    /// Adapted modules written.
    pub modules: usize,
    /// Tensors of `modules_to_save` written as full tensors.
    pub full_tensors: usize,
    /// Integer tensors of `modules_to_save` left out (adapters hold float tensors only).
    pub skipped: Vec<String>,
    pub warnings: Vec<String>,
}

/// `a` before `b` in natural order (`layers.2` before `layers.10`), so streams follow
/// the model's layer order.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = vec![];
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let key = |s| {
        chunks(s)
            .into_iter()
            .map(|(digits, c)| match digits {
                // Leading zeros do not change a number's place; length then value orders digit runs.
                true => (
                    0,
                    c.trim_start_matches('0').len(),
                    c.trim_start_matches('0').to_string(),
                ),
                false => (1, 0, c.to_string()),
            })
            .collect::<Vec<_>>()
    };
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

/// `ParamWrapper`'s `B` `(d_out, r * E)` (column `k * E + e` is expert `e`'s column `k`)
/// as `[E, d_out, r]`, bytes moved as they are.
fn deinterleave(b: OwnedTensor, d_out: usize, r: usize, experts: usize) -> OwnedTensor {
    let size = b.info.dtype.bitsize() / 8;
    let mut out = Vec::with_capacity(b.data.len());
    for e in 0..experts {
        for i in 0..d_out {
            for k in 0..r {
                let at = (i * r * experts + k * experts + e) * size;
                out.extend_from_slice(&b.data[at..at + size]);
            }
        }
    }
    OwnedTensor { data: out, ..b }
}

fn copy_tensor(adapter: &PeftAdapter, key: &str, name: &str) -> Result<OwnedTensor> {
    let (info, bytes) = adapter.file.tensor(key)?;
    OwnedTensor::new(name, info.dtype, info.shape.clone(), bytes.to_vec())
}

/// Converts the PEFT LoRA directory `peft` (or its `adapter_model.safetensors`) into
/// the asymlora adapter file `out`, written atomically. Every `A` is stored, so `seed`
/// is only recorded. Ranks come from the tensor shapes and are checked against the
/// config; per-module ranks and alphas become module overrides; `use_rslora` becomes
/// scaling `alpha/sqrt(r)`; float tensors of `modules_to_save` become full tensors
/// under their state-dict names; integer ones are skipped (listed in the report).
pub fn import_peft(peft: &Path, out: &Path, seed: u64) -> Result<ImportReport> {
    if !peft.exists() {
        return Err(Error::not_found(peft));
    }
    let dir = peft_dir(peft).ok_or_else(|| Error::AdapterFormat {
        path: peft.display().to_string(),
        location: "directory".into(),
        message: "is a file, not a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)".into(),
    })?;
    let adapter = PeftAdapter::open(&dir)?;
    let mut names: Vec<&String> = adapter.modules.keys().collect();
    names.sort_by(|a, b| natural_cmp(a, b));

    let mut modules = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    let mut stream = 0u64;
    for name in names {
        let m = &adapter.modules[name];
        let config = ModuleConfig {
            rank: (m.rank != adapter.rank).then_some(m.rank),
            alpha: (m.alpha != adapter.alpha).then_some(m.alpha),
            kind: m.kind,
            kernel: (m.kind == ModuleKind::Conv).then(|| m.kernel.clone()),
            experts: m.experts,
            ..ModuleConfig::linear(m.d_in, m.d_out, stream, true)
        };
        // each expert has a stream of its own, as a seeded adapter's would
        stream += config.blocks() as u64;
        let a = copy_tensor(&adapter, &m.a_key, &lora_a_name(name))?;
        tensors.insert(lora_a_name(name), a.reshaped(config.a_shape(m.rank)));
        let b = copy_tensor(&adapter, &m.b_key, &lora_b_name(name))?;
        let b = if m.b_interleaved {
            deinterleave(b, m.d_out, m.rank, config.blocks())
        } else {
            b
        };
        tensors.insert(lora_b_name(name), b.reshaped(config.b_shape(m.rank)));
        modules.insert(name.clone(), config);
    }
    let mut report = ImportReport {
        out: out.to_path_buf(),
        modules: modules.len(),
        warnings: adapter.warnings.clone(),
        ..ImportReport::default()
    };
    let mut full_tensors = vec![];
    for (name, key) in &adapter.full {
        let tensor = copy_tensor(&adapter, key, name)?;
        if is_integer(tensor.info.dtype) {
            report.warnings.push(format!(
                "{}: skipping the integer tensor {key} ({}) of modules_to_save; asymlora adapters hold float tensors \
                 only",
                adapter.file.path().display(),
                tensor.info.dtype
            ));
            report.skipped.push(key.clone());
            continue;
        }
        full_tensors.push(name.clone());
        tensors.insert(name.clone(), tensor);
    }
    report.full_tensors = full_tensors.len();
    let config = AdapterConfig {
        rank: adapter.rank,
        alpha: adapter.alpha,
        scaling: adapter.scaling,
        seed,
        generator: Generator::default().name().to_string(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors,
        base_model: Some(serde_json::Value::Object(adapter.base_model.clone())),
    };
    write_adapter(out, &config, &tensors)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut names = vec!["layers.10.q", "layers.2.q", "layers.2.k", "a", "layers.02.v"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["a", "layers.2.k", "layers.2.q", "layers.02.v", "layers.10.q"]);
    }
}
