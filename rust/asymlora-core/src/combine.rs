//! Exact adapter algebra: several adapters combined into one (spec: docs/combine.md).
//!
//! The combined adapter's update of every module is the weighted sum of the inputs'
//! updates, `s·B·A = sum_i w_i s_i B_i A_i`, exactly in real arithmetic; the only
//! rounding is that of the combined `B` to its dtype, once, from f64.
//!
//! Per module, the inputs that hold it are grouped by their `A`:
//!
//! * Inputs whose `A` is the same matrix (same generator, seed, `a_dtype`, `a_gain`,
//!   stream, rank and `d_in`, regenerated; or stored tensors with the same dtype, shape
//!   and bytes) form one group. One group only ("shared A"): the output keeps that `A`
//!   and the rank, and `B = sum_i w_i (s_i / s) B_i`, with `s` the output module's scale.
//! * Several groups ("concatenated"): `A = vstack(A_g)` is stored, the rank is the sum
//!   of the group ranks, alpha is chosen so that `s = 1`, and `B = hstack(B_g)` with
//!   `B_g = sum_{i in g} w_i (s_i / s) B_i`. Then `s·B·A = sum_g B_g A_g`.
//!
//! Modules present in only some inputs combine over the inputs that hold them (a module
//! of one input gets `w_i (s_i / s) B_i`), as a merge of the list would apply them.
//! Full tensors (`full_tensors`, PEFT's `modules_to_save`) are copied when one input
//! holds them and its weight is 1; otherwise they are refused, as a merge refuses them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::Dtype as StDtype;

use crate::adapter::{lora_a_name, lora_b_name, write_adapter, AdapterConfig, ModuleConfig, Scaling};
use crate::dtype::{encode_float, is_float, Dtype};
use crate::error::{problem_list, Error, Result};
use crate::io::{OwnedTensor, TensorInfo};
use crate::orthogonal::Generator;
use crate::peft::is_integer;
use crate::source::{decode, AOrigin, AdapterInput, Loaded, ModuleTerm, Source};

/// How to combine.
#[derive(Clone, Debug, Default)]
pub struct CombineOptions {
    /// Dtype of every output `B` (F16, BF16, F32 or F64). `None`: per module, the
    /// inputs' `B` dtype when they all agree, else F64 if any is F64, else F32.
    pub b_dtype: Option<StDtype>,
    /// Replace an existing output file.
    pub force: bool,
}

/// What a combination did.
#[derive(Clone, Debug, Default)]
pub struct CombineReport {
    pub out: PathBuf,
    /// Input adapters.
    pub adapters: usize,
    /// Modules written.
    pub modules: usize,
    /// Of those, modules whose inputs all share one `A`: `B`s summed, rank kept.
    pub shared: usize,
    /// Of those, modules over several distinct `A`s: `A`s stacked, ranks added.
    pub concatenated: usize,
    /// Modules whose `A` the output stores (every concatenated one, and shared ones whose
    /// `A` is stored in their input or does not come from the output's seed).
    pub stored_a: usize,
    /// Full tensors copied.
    pub full_tensors: usize,
    pub warnings: Vec<String>,
}

/// Parses the name of an output `B` dtype: `float32`, `float16`, `bfloat16` (and their
/// aliases) or `float64` / `f64`.
pub fn parse_b_dtype(name: &str) -> Result<StDtype> {
    match name {
        "float64" | "f64" | "F64" | "double" => Ok(StDtype::F64),
        other => other.parse::<Dtype>().map(Dtype::to_safetensors).map_err(|_| {
            Error::invalid(
                "b_dtype",
                format!("unknown dtype {other:?}; expected one of float32, float16, bfloat16, float64"),
            )
        }),
    }
}

// ------------------------------------------------------------------------- inputs

/// Whether two terms (of one module) have the very same `A`.
fn same_a(inputs: &[Loaded], x: &ModuleTerm, y: &ModuleTerm) -> Result<bool> {
    if x.rank != y.rank || x.d_in != y.d_in {
        return Ok(false);
    }
    Ok(match (&x.a, &y.a) {
        (AOrigin::Seeded { .. }, AOrigin::Seeded { .. }) => x.a == y.a,
        (AOrigin::Stored { key: kx }, AOrigin::Stored { key: ky }) => {
            let (ix, bx) = inputs[x.input].file().tensor(kx)?;
            let (iy, by) = inputs[y.input].file().tensor(ky)?;
            ix == iy && bx == by
        }
        _ => false,
    })
}

// ------------------------------------------------------------------------- numbers

/// The dtype several factors are stored in together: theirs when they agree, else
/// F64 if one is F64, else F32 (which holds F16 and BF16 values exactly).
fn common_dtype(dtypes: impl IntoIterator<Item = StDtype>) -> StDtype {
    let set: BTreeSet<String> = dtypes.into_iter().map(|d| d.to_string()).collect();
    match set.len() {
        1 => crate::dtype::st_dtype_from_code(set.iter().next().expect("one")).expect("a dtype code"),
        _ if set.contains("F64") => StDtype::F64,
        _ => StDtype::F32,
    }
}

/// The alpha that makes `s = 1` for a module of rank `rank` under `scaling`.
fn unit_alpha(scaling: Scaling, rank: usize) -> f64 {
    match scaling {
        Scaling::AlphaOverR => rank as f64,
        Scaling::AlphaOverSqrtR => (rank as f64).sqrt(),
    }
}

fn count_nonfinite(values: &[f64]) -> usize {
    values.iter().filter(|v| !v.is_finite()).count()
}

// ------------------------------------------------------------------------- output checks

fn check_output(out: &Path, inputs: &[Loaded], force: bool) -> Result<()> {
    let exists = |m: String| Error::Exists {
        path: out.to_path_buf(),
        message: m,
    };
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the directory {} does not exist", parent.display()),
            ),
        ));
    }
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(());
    };
    if meta.is_dir() {
        return Err(exists("is a directory; the output is one adapter file".into()));
    }
    let out_abs = out.canonicalize().map_err(|e| Error::io(out, e))?;
    for input in inputs {
        if input.file().path().canonicalize().ok().as_deref() == Some(out_abs.as_path()) {
            return Err(exists(format!(
                "is the input adapter {}; choose another output",
                input.label
            )));
        }
    }
    if !force {
        return Err(exists("already exists; pass --force (force=True) to replace it".into()));
    }
    Ok(())
}

// ------------------------------------------------------------------------- entry point

/// Combines `adapters` (each with its weight) into one adapter file `out` whose update
/// is the weighted sum of theirs; see the module docs.
pub fn combine(adapters: &[AdapterInput], out: &Path, opts: &CombineOptions) -> Result<CombineReport> {
    AdapterInput::check_all(adapters)?;
    if let Some(d) = opts.b_dtype {
        if !is_float(d) {
            return Err(Error::invalid(
                "b_dtype",
                format!("{d} is not a factor dtype; expected F16, BF16, F32 or F64"),
            ));
        }
    }
    let inputs: Vec<Loaded> = adapters.iter().map(Loaded::open).collect::<Result<_>>()?;
    check_output(out, &inputs, opts.force)?;

    let mut problems: Vec<String> = vec![];
    let transposed: Vec<bool> = inputs.iter().map(Loaded::transposed).collect();
    if let Some(i) = transposed.iter().position(|&t| t != transposed[0]) {
        problems.push(format!(
            "{} says fan_in_fan_out = {} but {} says {}: their modules cannot apply to the same base weights",
            inputs[0].label, transposed[0], inputs[i].label, transposed[i]
        ));
    }

    // Every module with the terms of the inputs that hold it, in input order.
    let mut modules: BTreeMap<String, Vec<ModuleTerm>> = BTreeMap::new();
    for (i, input) in inputs.iter().enumerate() {
        for term in input.modules(i) {
            let name = term.module.clone();
            if term.placement.experts.is_some() {
                problems.push(format!(
                    "module {name} of {} adapts an expert parameter (3-D): combine does not take expert \
                     parameters yet; merge the adapters instead",
                    input.label
                ));
                continue;
            }
            let terms = modules.entry(name.clone()).or_default();
            if let Some(first) = terms.first() {
                if (first.d_out, first.d_in) != (term.d_out, term.d_in) {
                    problems.push(format!(
                        "module {name} is {} x {} (d_out x d_in) in {} but {} x {} in {}",
                        first.d_out, first.d_in, inputs[first.input].label, term.d_out, term.d_in, input.label
                    ));
                    continue;
                }
                if first.placement != term.placement {
                    problems.push(format!(
                        "module {name} is a {} in {} but a {} in {}",
                        first.placement.describe(),
                        inputs[first.input].label,
                        term.placement.describe(),
                        input.label
                    ));
                    continue;
                }
            }
            terms.push(term);
        }
    }

    // Full tensors: copied from the one input that holds each, with weight 1.
    let mut full: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut warnings: Vec<String> = inputs.iter().flat_map(Loaded::warnings).collect();
    for (i, input) in inputs.iter().enumerate() {
        for (name, key) in input.full() {
            let (info, _) = input.file().tensor(&key)?;
            if is_integer(info.dtype) {
                warnings.push(format!(
                    "{}: skipping the integer tensor {key} ({}) of modules_to_save; asymlora adapters hold float \
                     tensors only",
                    input.label, info.dtype
                ));
                continue;
            }
            if input.input.weight != 1.0 {
                problems.push(format!(
                    "{}: holds the full tensor {name} (trained in full, PEFT's modules_to_save), which cannot be \
                     weighted: give this adapter weight 1",
                    input.label
                ));
                continue;
            }
            if let Some((j, _)) = full.get(&name) {
                problems.push(format!(
                    "{} and {} both hold the full tensor {name}, which cannot be summed: a merge replaces it as a \
                     whole",
                    inputs[*j].label, input.label
                ));
                continue;
            }
            full.insert(name, (i, key));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Mismatch {
            message: format!(
                "{} problem(s) combining the adapters; nothing was written: {}",
                problems.len(),
                problem_list(&problems)
            ),
        });
    }

    // The output's adapter-wide fields: rank, alpha, scaling, base_model of the first
    // input; generator, seed, a_dtype, a_gain of the first asymlora file among them.
    let (rank, alpha, scaling, base_model) = match &inputs[0].source {
        Source::V1(a) => {
            let c = a.config();
            (c.rank, c.alpha, c.scaling, c.base_model.clone())
        }
        Source::Peft(p) => (
            p.rank,
            p.alpha,
            p.scaling,
            Some(serde_json::Value::Object(p.base_model.clone())),
        ),
    };
    let (generator, seed, a_dtype, a_gain) = inputs
        .iter()
        .find_map(|i| match &i.source {
            Source::V1(a) => {
                let c = a.config();
                Some((c.generator.clone(), c.seed, c.a_dtype, c.a_gain))
            }
            Source::Peft(_) => None,
        })
        .unwrap_or_else(|| (Generator::default().name().to_string(), 0, Dtype::F32, 1.0));
    let mut config = AdapterConfig {
        rank,
        alpha,
        scaling,
        seed,
        generator: generator.clone(),
        a_dtype,
        a_gain,
        modules: BTreeMap::new(),
        full_tensors: full.keys().cloned().collect(),
        base_model,
    };
    let output_origin = |stream: u64| AOrigin::Seeded {
        generator: generator.clone(),
        seed,
        a_dtype,
        a_gain: a_gain.to_bits(),
        stream,
    };

    let mut report = CombineReport {
        out: out.to_path_buf(),
        adapters: inputs.len(),
        ..CombineReport::default()
    };
    let mut tensors: BTreeMap<String, OwnedTensor> = BTreeMap::new();
    let mut seeded_streams: BTreeSet<u64> = BTreeSet::new();
    let mut nonfinite: Vec<String> = vec![];
    for (name, terms) in &modules {
        // Group the terms by their A (first occurrence order).
        let mut groups: Vec<Vec<usize>> = vec![];
        for (t, term) in terms.iter().enumerate() {
            let mut found = None;
            for (g, members) in groups.iter().enumerate() {
                if same_a(&inputs, &terms[members[0]], term)? {
                    found = Some(g);
                    break;
                }
            }
            match found {
                Some(g) => groups[g].push(t),
                None => groups.push(vec![t]),
            }
        }
        let first = &terms[0];
        let (d_in, d_out) = (first.d_in, first.d_out);
        let shared = groups.len() == 1;
        let out_rank: usize = groups.iter().map(|g| terms[g[0]].rank).sum();
        let out_alpha = if shared && first.alpha != 0.0 {
            first.alpha
        } else {
            unit_alpha(scaling, out_rank)
        };
        let seeded = shared && first.a == output_origin(first.stream) && !seeded_streams.contains(&first.stream);
        let module = ModuleConfig {
            rank: (out_rank != rank).then_some(out_rank),
            alpha: (out_alpha != alpha).then_some(out_alpha),
            ..ModuleConfig::linear(d_in, d_out, first.stream, !seeded).with_kind_of(&first.placement)
        };
        let s_out = config.module_scale(&module);

        // B = hstack over groups of sum_{t in g} w_t (s_t / s) B_t, in f64.
        let mut b = vec![-0f64; d_out * out_rank]; // -0 + x == x, signed zeros included
        let mut b_dtypes = vec![];
        let mut offset = 0;
        for g in &groups {
            let r = terms[g[0]].rank;
            for &t in g {
                let term = &terms[t];
                let input = &inputs[term.input];
                let (info, bytes) = input.file().tensor(&term.b_key)?;
                b_dtypes.push(info.dtype);
                let values = decode(info.dtype, bytes);
                let bad = count_nonfinite(&values);
                if bad > 0 {
                    nonfinite.push(format!(
                        "{}: {} holds {bad} NaN or infinite value(s)",
                        input.label, term.b_key
                    ));
                }
                let coef = input.input.weight * term.scale / s_out;
                for i in 0..d_out {
                    let row = &mut b[i * out_rank + offset..i * out_rank + offset + r];
                    for (x, v) in row.iter_mut().zip(&values[i * r..(i + 1) * r]) {
                        *x += coef * v;
                    }
                }
            }
            offset += r;
        }
        let b_dtype = opts.b_dtype.unwrap_or_else(|| common_dtype(b_dtypes));
        let b_bytes = encode_float(b_dtype, &b).expect("B dtypes are float");
        let rounded = decode(b_dtype, &b_bytes);
        if nonfinite.is_empty() && count_nonfinite(&rounded) > 0 {
            nonfinite.push(format!(
                "module {name}: the combined B overflows {b_dtype} ({} value(s)); choose a wider b_dtype",
                count_nonfinite(&rounded)
            ));
        }
        let b_name = lora_b_name(name);
        tensors.insert(
            b_name.clone(),
            OwnedTensor::new(&b_name, b_dtype, vec![d_out, out_rank], b_bytes)?,
        );

        if seeded {
            seeded_streams.insert(first.stream);
        } else {
            // A = vstack of the groups' A, in one dtype.
            let parts: Vec<(StDtype, Vec<u8>)> = groups
                .iter()
                .map(|g| inputs[terms[g[0]].input].a_bytes(&terms[g[0]]))
                .collect::<Result<_>>()?;
            for ((_, bytes), g) in parts.iter().zip(&groups) {
                let term = &terms[g[0]];
                if let AOrigin::Stored { key } = &term.a {
                    let (info, _) = inputs[term.input].file().tensor(key)?;
                    let bad = count_nonfinite(&decode(info.dtype, bytes));
                    if bad > 0 {
                        nonfinite.push(format!(
                            "{}: {key} holds {bad} NaN or infinite value(s)",
                            inputs[term.input].label
                        ));
                    }
                }
            }
            let a_dtype = common_dtype(parts.iter().map(|(d, _)| *d));
            let a_bytes: Vec<u8> = parts
                .iter()
                .flat_map(|(d, bytes)| {
                    if *d == a_dtype {
                        bytes.clone()
                    } else {
                        encode_float(a_dtype, &decode(*d, bytes)).expect("A dtypes are float")
                        // exact: a_dtype is wider
                    }
                })
                .collect();
            let a_name = lora_a_name(name);
            tensors.insert(
                a_name.clone(),
                OwnedTensor::new(&a_name, a_dtype, vec![out_rank, d_in], a_bytes)?,
            );
            report.stored_a += 1;
        }
        if shared {
            report.shared += 1;
        } else {
            report.concatenated += 1;
        }
        config.modules.insert(name.to_string(), module);
    }
    for (name, (i, key)) in &full {
        let (info, bytes) = inputs[*i].file().tensor(key)?;
        let TensorInfo { dtype, shape } = info.clone();
        let bad = count_nonfinite(&decode(dtype, bytes));
        if bad > 0 {
            nonfinite.push(format!(
                "{}: {key} holds {bad} NaN or infinite value(s)",
                inputs[*i].label
            ));
        }
        tensors.insert(name.clone(), OwnedTensor::new(name, dtype, shape, bytes.to_vec())?);
    }
    if !nonfinite.is_empty() {
        return Err(Error::NonFinite {
            message: format!(
                "{} problem(s) combining the adapters; nothing was written: {}",
                nonfinite.len(),
                problem_list(&nonfinite)
            ),
        });
    }
    report.modules = config.modules.len();
    report.full_tensors = full.len();
    report.warnings = warnings;
    write_adapter(out, &config, &tensors)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b_dtype_names() {
        assert_eq!(parse_b_dtype("float64").unwrap(), StDtype::F64);
        assert_eq!(parse_b_dtype("bf16").unwrap(), StDtype::BF16);
        assert_eq!(parse_b_dtype("float32").unwrap(), StDtype::F32);
        let err = parse_b_dtype("int8").unwrap_err().to_string();
        assert!(err.contains("b_dtype") && err.contains("float64"), "{err}");
    }

    #[test]
    fn common_dtypes() {
        assert_eq!(common_dtype([StDtype::BF16, StDtype::BF16]), StDtype::BF16);
        assert_eq!(common_dtype([StDtype::BF16, StDtype::F16]), StDtype::F32);
        assert_eq!(common_dtype([StDtype::F32, StDtype::F64]), StDtype::F64);
        assert_eq!(common_dtype([StDtype::F16]), StDtype::F16);
    }

    #[test]
    fn unit_alphas_give_unit_scale() {
        for r in 1..200 {
            for s in Scaling::ALL {
                assert_eq!(s.scale(unit_alpha(s, r), r), 1.0, "{s:?} r={r}");
            }
        }
    }
}
