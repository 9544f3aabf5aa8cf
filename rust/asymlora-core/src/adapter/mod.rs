//! The seed-plus-B adapter file, format v1 (spec: docs/adapter-format-v1.md).
//!
//! One safetensors file: `{module}.lora_B` for every adapted module, `{module}.lora_A`
//! only where `A` cannot be regenerated, full tensors listed in `full_tensors`, and
//! the config as JSON in `__metadata__`.

mod config;
mod file;
mod inspect;
mod validate;
mod write;

pub use crate::io::OwnedTensor;
pub use config::{
    AdapterConfig, ModuleConfig, ModuleKind, Placement, Scaling, FORMAT_NAME, FORMAT_VERSION, META_CONFIG, META_FORMAT,
    META_VERSION,
};
pub use file::{AdapterFile, FactorA};
pub use inspect::{human_bytes, render_inspect};
pub use validate::{validate_config, TensorInfo};
pub use write::write_adapter;

/// Tensor name of a module's `B` factor.
pub fn lora_b_name(module: &str) -> String {
    format!("{module}.lora_B")
}

/// Tensor name of a module's stored `A` factor.
pub fn lora_a_name(module: &str) -> String {
    format!("{module}.lora_A")
}
