//! The JSON config stored in an adapter's `__metadata__`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::orthogonal::OrthogonalSpec;

pub const FORMAT_NAME: &str = "asymlora";
pub const FORMAT_VERSION: &str = "1";
pub const META_FORMAT: &str = "format";
pub const META_VERSION: &str = "format_version";
pub const META_CONFIG: &str = "asymlora_config";

/// How the low-rank update is scaled: `s = alpha / r` (LoRA) or `alpha / sqrt(r)` (rsLoRA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Scaling {
    #[default]
    #[serde(rename = "alpha/r")]
    AlphaOverR,
    #[serde(rename = "alpha/sqrt(r)")]
    AlphaOverSqrtR,
}

impl Scaling {
    pub const ALL: [Scaling; 2] = [Scaling::AlphaOverR, Scaling::AlphaOverSqrtR];

    /// `alpha / sqrt(r)` for rank-stabilised LoRA (PEFT's `use_rslora`), else `alpha / r`.
    pub fn from_rslora(rslora: bool) -> Scaling {
        if rslora {
            Scaling::AlphaOverSqrtR
        } else {
            Scaling::AlphaOverR
        }
    }

    pub fn is_rslora(self) -> bool {
        self == Scaling::AlphaOverSqrtR
    }

    /// `s` in `W + s B A` for a module of rank `rank` and scale numerator `alpha`.
    pub fn scale(self, alpha: f64, rank: usize) -> f64 {
        match self {
            Scaling::AlphaOverR => alpha / rank as f64,
            Scaling::AlphaOverSqrtR => alpha / (rank as f64).sqrt(),
        }
    }

    /// The name adapter files store (`"alpha/r"`, `"alpha/sqrt(r)"`).
    pub fn name(self) -> &'static str {
        match self {
            Scaling::AlphaOverR => "alpha/r",
            Scaling::AlphaOverSqrtR => "alpha/sqrt(r)",
        }
    }
}

impl std::str::FromStr for Scaling {
    type Err = crate::error::Error;

    fn from_str(s: &str) -> crate::error::Result<Scaling> {
        Scaling::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            crate::error::Error::invalid(
                "scaling",
                format!("unknown scaling {s:?}; expected \"alpha/r\" or \"alpha/sqrt(r)\""),
            )
        })
    }
}

fn one() -> f64 {
    1.0
}

/// Reads an optional field where `null` means "absent", like a missing key.
fn null_as_default<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn null_as_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(1.0))
}

/// A wrong field's message, with its JSON path unless the problem is the whole config.
fn field_message(path: &str, inner: &serde_json::Error) -> String {
    if path == "." {
        inner.to_string()
    } else {
        format!("field {path}: {inner}")
    }
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// One adapted linear map `W (d_out x d_in) + s B A`.
///
/// Unknown fields are refused, not dropped: a reader that ignored them would lose
/// them on the next write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub d_in: usize,
    pub d_out: usize,
    /// Stream id of this module's `A` under the adapter seed; independent of the name.
    pub stream: u64,
    /// `true` when `{module}.lora_A` is in the file (trained or imported `A`).
    pub a_stored: bool,
    /// Per-module rank, overriding the adapter's `rank`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Per-module alpha, overriding the adapter's `alpha`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
}

/// The adapter-wide config (unknown fields are refused, as for [`ModuleConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub scaling: Scaling,
    pub seed: u64,
    /// Name of the generator of non-stored `A`s (e.g. `haar-v1`).
    pub generator: String,
    /// Dtype regenerated `A`s are produced in. A stored `A` keeps its own dtype.
    pub a_dtype: Dtype,
    /// Factor applied to every generated `A` before rounding.
    #[serde(default = "one", skip_serializing_if = "is_one", deserialize_with = "null_as_one")]
    pub a_gain: f64,
    pub modules: BTreeMap<String, ModuleConfig>,
    /// Tensors trained in full (e.g. a classifier head), stored under their own names.
    #[serde(default, deserialize_with = "null_as_default")]
    pub full_tensors: Vec<String>,
    /// Optional description of the base model the adapter was trained on (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<serde_json::Value>,
}

impl AdapterConfig {
    pub fn module_rank(&self, module: &ModuleConfig) -> usize {
        module.rank.unwrap_or(self.rank)
    }

    pub fn module_alpha(&self, module: &ModuleConfig) -> f64 {
        module.alpha.unwrap_or(self.alpha)
    }

    /// The factor `s` in `W + s B A` for `module`.
    pub fn module_scale(&self, module: &ModuleConfig) -> f64 {
        self.scaling.scale(self.module_alpha(module), self.module_rank(module))
    }

    /// What determines the regenerated `A` of `module`.
    pub fn a_spec(&self, module: &ModuleConfig) -> OrthogonalSpec {
        OrthogonalSpec::new(self.module_rank(module), module.d_in, self.seed, module.stream).with_gain(self.a_gain)
    }

    /// Parses a config; an error names the JSON path of the bad field.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => field_message(&path, &inner),
                // serde_json's text reader reports a wrong-typed enum (`"scaling": false`)
                // as a syntax error; valid JSON read again as a value gives the real one.
                _ => match serde_json::from_str::<serde_json::Value>(json) {
                    Ok(value) => match serde_path_to_error::deserialize::<_, AdapterConfig>(value) {
                        Err(e) => field_message(&e.path().to_string(), e.inner()),
                        Ok(_) => format!("not valid JSON: {inner}"),
                    },
                    Err(_) => format!("not valid JSON: {inner}"),
                },
            }
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises: no non-string map keys")
    }
}
