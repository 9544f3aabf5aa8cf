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

/// What an adapted module is, and so how its matrix `W (d_out x d_in)` sits in the
/// base tensor (see [`ModuleConfig::base_tensor`] and [`ModuleConfig::base_shape`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    /// `{module}.weight` is `W` (d_out x d_in), or `W^T` under the base's `fan_in_fan_out`.
    #[default]
    Linear,
    /// `{module}.weight` (num_embeddings x embedding_dim) is `W^T`: d_in = num_embeddings.
    Embedding,
    /// `{module}.weight` (c_out x c_in x *kernel) flattened row-major to c_out x (c_in * prod(kernel)) is `W`.
    Conv,
    /// The parameter `{module}` itself (no `.weight`): `W`, or `E` blocks `[E, d_out, d_in]`
    /// with `experts`, each block transposed (`[E, d_in, d_out]`) with `transposed`.
    Parameter,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 4] = [
        ModuleKind::Linear,
        ModuleKind::Embedding,
        ModuleKind::Conv,
        ModuleKind::Parameter,
    ];

    /// The name adapter files store.
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Linear => "linear",
            ModuleKind::Embedding => "embedding",
            ModuleKind::Conv => "conv",
            ModuleKind::Parameter => "parameter",
        }
    }

    fn is_linear(&self) -> bool {
        *self == ModuleKind::Linear
    }
}

/// One adapted module: a matrix `W (d_out x d_in) + s B A` (per expert for a 3-D
/// parameter), placed in the base tensor as its `kind` says.
///
/// Unknown fields are refused, not dropped: a reader that ignored them would lose
/// them on the next write. The kind fields are omitted for a linear module, so a
/// linear-only adapter is written exactly as before they existed.
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
    /// How `W` sits in the base tensor (omitted: linear).
    #[serde(
        default,
        skip_serializing_if = "ModuleKind::is_linear",
        deserialize_with = "null_as_default"
    )]
    pub kind: ModuleKind,
    /// Conv only: the kernel size (1 to 3 integers); `d_in = c_in * prod(kernel)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Vec<usize>>,
    /// Parameter only: the number of experts `E` of a 3-D parameter `[E, d_out, d_in]`
    /// (omitted: a 2-D parameter). Expert `e`'s `A` is generated on stream `stream + e`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<usize>,
    /// Parameter only: each (expert) block is stored transposed, `d_in x d_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transposed: Option<bool>,
}

impl ModuleConfig {
    /// A linear module (every kind field at its default).
    pub fn linear(d_in: usize, d_out: usize, stream: u64, a_stored: bool) -> ModuleConfig {
        ModuleConfig {
            d_in,
            d_out,
            stream,
            a_stored,
            rank: None,
            alpha: None,
            kind: ModuleKind::Linear,
            kernel: None,
            experts: None,
            transposed: None,
        }
    }

    /// This module with the kind fields that give `placement` (its shape aside).
    pub fn with_kind_of(self, placement: &Placement) -> ModuleConfig {
        let kind = placement.kind;
        ModuleConfig {
            kind,
            kernel: (kind == ModuleKind::Conv).then(|| placement.kernel.clone()),
            experts: placement.experts,
            transposed: (kind == ModuleKind::Parameter && placement.transposed).then_some(true),
            ..self
        }
    }

    /// The module's placement in the base tensor; `fan_in_fan_out` is the adapter's
    /// (base model's) flag, which applies to linear modules only.
    pub fn placement(&self, fan_in_fan_out: bool) -> Placement {
        Placement {
            kind: self.kind,
            d_in: self.d_in,
            d_out: self.d_out,
            kernel: self.kernel.clone().unwrap_or_default(),
            experts: self.experts,
            transposed: match self.kind {
                ModuleKind::Linear => fan_in_fan_out,
                ModuleKind::Embedding => true,
                ModuleKind::Conv => false,
                ModuleKind::Parameter => self.transposed.unwrap_or(false),
            },
        }
    }

    /// Number of `(A, B)` pairs: `experts` for a 3-D parameter, else 1.
    pub fn blocks(&self) -> usize {
        self.experts.unwrap_or(1)
    }

    /// Shape of the stored `{module}.lora_A` of rank `r`.
    pub fn a_shape(&self, r: usize) -> Vec<usize> {
        match self.experts {
            Some(e) => vec![e, r, self.d_in],
            None => vec![r, self.d_in],
        }
    }

    /// Shape of `{module}.lora_B` of rank `r`.
    pub fn b_shape(&self, r: usize) -> Vec<usize> {
        match self.experts {
            Some(e) => vec![e, self.d_out, r],
            None => vec![self.d_out, r],
        }
    }
}

/// Where an adapted matrix sits in the base model's tensor: the one place that knows
/// each kind's tensor name and shape (merge, import and inspect read it from here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub kind: ModuleKind,
    pub d_in: usize,
    pub d_out: usize,
    /// Conv kernel size (empty otherwise).
    pub kernel: Vec<usize>,
    /// Experts of a 3-D parameter.
    pub experts: Option<usize>,
    /// Each block of the base tensor is `W^T` (d_in x d_out): a linear under
    /// `fan_in_fan_out`, an embedding, a transposed parameter.
    pub transposed: bool,
}

impl Placement {
    /// A linear module's placement.
    pub fn linear(d_in: usize, d_out: usize, transposed: bool) -> Placement {
        Placement {
            kind: ModuleKind::Linear,
            d_in,
            d_out,
            kernel: vec![],
            experts: None,
            transposed,
        }
    }

    /// Name of the base tensor `module` adapts: the parameter itself, else `{module}.weight`.
    pub fn base_tensor(&self, module: &str) -> String {
        match self.kind {
            ModuleKind::Parameter => module.to_string(),
            _ => format!("{module}.weight"),
        }
    }

    /// Rows x columns of one block of the base tensor, as stored.
    pub fn block_shape(&self) -> [usize; 2] {
        if self.transposed {
            [self.d_in, self.d_out]
        } else {
            [self.d_out, self.d_in]
        }
    }

    /// Number of blocks (experts) in the base tensor.
    pub fn blocks(&self) -> usize {
        self.experts.unwrap_or(1)
    }

    /// The shape the base tensor must have.
    pub fn base_shape(&self) -> Vec<usize> {
        let block = self.block_shape();
        match (self.kind, self.experts) {
            (ModuleKind::Conv, _) => {
                let taps: usize = self.kernel.iter().product::<usize>().max(1);
                let mut shape = vec![self.d_out, self.d_in / taps];
                shape.extend(&self.kernel);
                shape
            }
            (_, Some(e)) => vec![e, block[0], block[1]],
            _ => block.to_vec(),
        }
    }

    /// The module as messages describe it, e.g. `conv 16 x 27 (kernel [3, 3])`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {} x {} (d_out x d_in)", self.kind.name(), self.d_out, self.d_in);
        if !self.kernel.is_empty() {
            s.push_str(&format!(", kernel {:?}", self.kernel));
        }
        if let Some(e) = self.experts {
            s.push_str(&format!(", {e} experts"));
        }
        if self.transposed {
            s.push_str(", stored transposed");
        }
        s
    }
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

    /// What determines the regenerated `A` of `module` (of its first expert).
    pub fn a_spec(&self, module: &ModuleConfig) -> OrthogonalSpec {
        self.block_a_spec(module, 0)
    }

    /// What determines the regenerated `A` of expert `block` of `module`: stream
    /// `module.stream + block` (validation keeps that sum in range).
    pub fn block_a_spec(&self, module: &ModuleConfig, block: usize) -> OrthogonalSpec {
        OrthogonalSpec::new(
            self.module_rank(module),
            module.d_in,
            self.seed,
            module.stream + block as u64,
        )
        .with_gain(self.a_gain)
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
