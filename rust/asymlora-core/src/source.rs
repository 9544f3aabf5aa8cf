//! An adapter to apply, from either kind of source: an asymlora v1 file (`A`
//! regenerated from its seed unless stored) or a PEFT LoRA directory (every `A`
//! stored, read by [`crate::peft`]). The offline merge and `combine` both read their
//! adapters through [`Loaded`], so an adapter means the same to both.

use std::path::{Path, PathBuf};

use safetensors::Dtype as StDtype;

use crate::adapter::{lora_a_name, lora_b_name, AdapterFile, FactorA, Placement};
use crate::dtype::{decode_float, Dtype, Matrix};
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::peft::{self, PeftAdapter};

/// One adapter to apply (merge, unmerge, combine) and its weight `w_i`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInput {
    pub path: PathBuf,
    pub weight: f64,
}

impl AdapterInput {
    pub fn new(path: impl Into<PathBuf>, weight: f64) -> Self {
        AdapterInput {
            path: path.into(),
            weight,
        }
    }

    /// Checks a list of inputs: at least one, every weight finite.
    pub fn check_all(adapters: &[AdapterInput]) -> Result<()> {
        if adapters.is_empty() {
            return Err(Error::invalid("adapters", "give at least one adapter"));
        }
        match adapters.iter().find(|a| !a.weight.is_finite()) {
            Some(a) => Err(Error::invalid(
                "weights",
                format!(
                    "{}: the weight must be a finite number, got {}",
                    a.path.display(),
                    a.weight
                ),
            )),
            None => Ok(()),
        }
    }

    /// Parses `PATH` or `PATH:WEIGHT` (weight 1 when absent). A path that exists as
    /// given is taken whole, colons included.
    pub fn parse(arg: &str) -> Result<AdapterInput> {
        if Path::new(arg).exists() {
            return Ok(AdapterInput::new(arg, 1.0));
        }
        if let Some((path, weight)) = arg.rsplit_once(':') {
            match weight.trim().parse::<f64>() {
                Ok(w) if w.is_finite() => return Ok(AdapterInput::new(path, w)),
                Ok(w) => {
                    return Err(Error::invalid(
                        "adapters",
                        format!("{arg:?}: the weight must be a finite number, got {w}"),
                    ))
                }
                Err(_) if Path::new(path).exists() => {
                    return Err(Error::invalid(
                        "adapters",
                        format!(
                            "{arg:?}: {weight:?} is not a number; write ADAPTER or ADAPTER:WEIGHT, e.g. {path}:0.5"
                        ),
                    ))
                }
                Err(_) => {}
            }
        }
        Ok(AdapterInput::new(arg, 1.0))
    }
}

pub(crate) enum Source {
    V1(AdapterFile),
    Peft(PeftAdapter),
}

/// An open, checked adapter with its weight.
pub(crate) struct Loaded {
    pub input: AdapterInput,
    /// The path as given, for messages.
    pub label: String,
    pub source: Source,
}

/// Where a module's `A` comes from. Two modules have the very same `A` when their
/// seeded origins (and rank and `d_in`) agree, or when their stored tensors are equal.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum AOrigin {
    Seeded {
        generator: String,
        seed: u64,
        a_dtype: Dtype,
        /// bits of `a_gain`, so that equality is exact
        a_gain: u64,
        stream: u64,
    },
    Stored {
        key: String,
    },
}

/// One adapted module of a loaded adapter.
#[derive(Clone, Debug)]
pub(crate) struct ModuleTerm {
    /// Index of the adapter among the inputs.
    pub input: usize,
    pub module: String,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub alpha: f64,
    /// `s` in `W + s B A`.
    pub scale: f64,
    pub stream: u64,
    /// Where the matrix sits in the base: tensor name, shape, experts, and whether each
    /// block is stored transposed (PEFT's `fan_in_fan_out`, GPT-2's `Conv1D`, embeddings).
    pub placement: Placement,
    pub a: AOrigin,
    pub b_key: String,
    /// `B` is PEFT's `ParamWrapper` layout `(d_out, r * E)`, rank-major: expert `e`'s
    /// column `k` is column `k * E + e`. Otherwise `B` is `[E, d_out, r]` (or `d_out x r`).
    pub b_interleaved: bool,
}

impl ModuleTerm {
    /// Key of a stored `A`, or `None` for one regenerated from the seed.
    pub fn a_key(&self) -> Option<&String> {
        match &self.a {
            AOrigin::Stored { key } => Some(key),
            AOrigin::Seeded { .. } => None,
        }
    }
}

/// Values of a little-endian float tensor (a dtype checked when the file was opened),
/// widened exactly to f64.
pub(crate) fn decode(dtype: StDtype, bytes: &[u8]) -> Vec<f64> {
    decode_float(dtype, bytes).expect("float dtypes checked on open")
}

impl Loaded {
    pub fn open(input: &AdapterInput) -> Result<Loaded> {
        if !input.path.exists() {
            return Err(Error::not_found(&input.path));
        }
        let source = match peft::peft_dir(&input.path) {
            Some(dir) => Source::Peft(PeftAdapter::open(&dir)?),
            None => Source::V1(AdapterFile::open(&input.path)?),
        };
        Ok(Loaded {
            input: input.clone(),
            label: input.path.display().to_string(),
            source,
        })
    }

    pub fn file(&self) -> &SafetensorsFile {
        match &self.source {
            Source::V1(a) => a.safetensors(),
            Source::Peft(p) => &p.file,
        }
    }

    /// Whether the base stores the adapted weights transposed (`fan_in_fan_out`).
    pub fn transposed(&self) -> bool {
        match &self.source {
            Source::V1(a) => a
                .config()
                .base_model
                .as_ref()
                .and_then(|b| b.get("fan_in_fan_out"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            Source::Peft(p) => p.fan_in_fan_out,
        }
    }

    /// The adapted modules; `input` is this adapter's index among the inputs. A PEFT
    /// module's stream is its place in name order (its `A` is stored either way).
    pub fn modules(&self, input: usize) -> Vec<ModuleTerm> {
        let transposed = self.transposed();
        match &self.source {
            Source::V1(a) => {
                let c = a.config();
                c.modules
                    .iter()
                    .map(|(name, m)| ModuleTerm {
                        input,
                        module: name.clone(),
                        rank: c.module_rank(m),
                        d_in: m.d_in,
                        d_out: m.d_out,
                        alpha: c.module_alpha(m),
                        scale: c.module_scale(m),
                        stream: m.stream,
                        placement: m.placement(transposed),
                        a: if m.a_stored {
                            AOrigin::Stored { key: lora_a_name(name) }
                        } else {
                            AOrigin::Seeded {
                                generator: c.generator.clone(),
                                seed: c.seed,
                                a_dtype: c.a_dtype,
                                a_gain: c.a_gain.to_bits(),
                                stream: m.stream,
                            }
                        },
                        b_key: lora_b_name(name),
                        b_interleaved: false,
                    })
                    .collect()
            }
            Source::Peft(p) => p
                .modules
                .iter()
                .enumerate()
                .map(|(stream, (name, m))| ModuleTerm {
                    input,
                    module: name.clone(),
                    rank: m.rank,
                    d_in: m.d_in,
                    d_out: m.d_out,
                    alpha: m.alpha,
                    scale: m.scale,
                    stream: stream as u64,
                    placement: m.placement(transposed),
                    a: AOrigin::Stored { key: m.a_key.clone() },
                    b_key: m.b_key.clone(),
                    b_interleaved: m.b_interleaved,
                })
                .collect(),
        }
    }

    /// Full tensors: (name in the base model, key in the adapter file).
    pub fn full(&self) -> Vec<(String, String)> {
        match &self.source {
            Source::V1(a) => a.config().full_tensors.iter().map(|n| (n.clone(), n.clone())).collect(),
            Source::Peft(p) => p.full.iter().map(|(n, k)| (n.clone(), k.clone())).collect(),
        }
    }

    pub fn warnings(&self) -> Vec<String> {
        match &self.source {
            Source::V1(_) => vec![],
            Source::Peft(p) => p.warnings.clone(),
        }
    }

    /// `A_e` (r x d_in) and `B_e` (d_out x r) of expert `block` of `m` (block 0 of a
    /// module without experts) as exact f64 values; pages read are released.
    pub fn block_factors(&self, m: &ModuleTerm, block: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let (r, d_in, d_out) = (m.rank, m.d_in, m.d_out);
        let a = match m.a_key() {
            Some(key) => self.run(key, block * r * d_in, r * d_in)?,
            None => match &self.source {
                Source::V1(a) => a.generated_a_block(&m.module, block)?.to_f64(),
                Source::Peft(_) => unreachable!("PEFT adapters store every A"),
            },
        };
        let experts = m.placement.blocks();
        let b = if m.b_interleaved {
            // element (i, k) of B_e is B[i, k * E + e] of the (d_out, r * E) tensor
            self.elements(
                &m.b_key,
                |n| (n / r) * r * experts + (n % r) * experts + block,
                d_out * r,
            )?
        } else {
            self.run(&m.b_key, block * d_out * r, d_out * r)?
        };
        Ok((a, b))
    }

    /// Elements `start..start + n` of a stored float tensor, exact in f64; its pages are released.
    fn run(&self, key: &str, start: usize, n: usize) -> Result<Vec<f64>> {
        let (info, bytes) = self.file().tensor(key)?;
        let size = info.dtype.bitsize() / 8;
        let values = decode(info.dtype, &bytes[start * size..(start + n) * size]);
        if let Some(range) = self.file().range(key) {
            self.file().release(range);
        }
        Ok(values)
    }

    /// Elements `index(0..n)` of a stored float tensor, exact in f64; its pages are released.
    fn elements(&self, key: &str, index: impl Fn(usize) -> usize, n: usize) -> Result<Vec<f64>> {
        let (info, bytes) = self.file().tensor(key)?;
        let size = info.dtype.bitsize() / 8;
        let mut picked = Vec::with_capacity(n * size);
        for i in 0..n {
            let at = index(i) * size;
            picked.extend_from_slice(&bytes[at..at + size]);
        }
        if let Some(range) = self.file().range(key) {
            self.file().release(range);
        }
        Ok(decode(info.dtype, &picked))
    }

    /// `A` of `m` as (dtype, little-endian bytes): stored, or regenerated from the seed.
    pub fn a_bytes(&self, m: &ModuleTerm) -> Result<(StDtype, Vec<u8>)> {
        match m.a_key() {
            Some(key) => {
                let (info, bytes) = self.file().tensor(key)?;
                Ok((info.dtype, bytes.to_vec()))
            }
            None => {
                let matrix = self.generated_a(m)?;
                Ok((matrix.dtype().to_safetensors(), matrix.to_le_bytes()))
            }
        }
    }

    /// The regenerated `A` of a module whose `A` is seeded.
    fn generated_a(&self, m: &ModuleTerm) -> Result<Matrix> {
        match &self.source {
            Source::V1(a) => match a.lora_a(&m.module)? {
                FactorA::Generated(matrix) => Ok(matrix),
                FactorA::Stored { .. } => unreachable!("a seeded origin is only given to a generated A"),
            },
            Source::Peft(_) => unreachable!("PEFT adapters store every A"),
        }
    }
}
