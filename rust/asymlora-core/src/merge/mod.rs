//! Offline merge: adapters streamed into a safetensors checkpoint, tensor by tensor.
//!
//! `W' = W + sum_i w_i * s_i * B_i A_i` (minus, to unmerge) for every adapted weight,
//! computed in f32 or f64 from the stored dtype and rounded once (see [`engine`]);
//! every other tensor is copied bit for bit (by the kernel where it can). Adapters are
//! asymlora v1 files (`A` regenerated from the seed) or PEFT LoRA directories ([`peft`]).
//! The base is one file or a model directory ([`checkpoint`]); the output mirrors it:
//! same files, tensor order, dtypes (unless asked otherwise) and metadata.
//!
//! Everything is checked before anything is written, and the output is built under a
//! temporary name next to its destination and renamed into place at the end, so a
//! failure or an interruption never leaves anything under the destination name.
//! Memory stays bounded: inputs are memory-mapped and released piece by piece, and
//! merged tensors are computed and written in bands of rows (a few MiB each).

mod checkpoint;
mod engine;
mod split;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype as StDtype;

use crate::adapter::{ModuleKind, Placement};
use crate::dtype::Dtype;
use crate::error::{problem_list, Error, Result};
use crate::io::TensorInfo;
pub use crate::source::AdapterInput;
use crate::source::{Loaded, ModuleTerm};
use checkpoint::Checkpoint;
pub use checkpoint::{INDEX_NAME, WEIGHTS_NAME};
use engine::{count_nonfinite, Float};

/// Parses `OLD=NEW` for [`MergeOptions::prefix_map`] (either side may be empty).
pub fn parse_prefix_map(arg: &str) -> Result<(String, String)> {
    arg.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .filter(|(a, b)| a != b)
        .ok_or_else(|| {
            Error::invalid(
                "prefix_map",
                format!("{arg:?}: expected OLD=NEW with OLD != NEW (e.g. base_model.model.=model.)"),
            )
        })
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Output dtype of every floating-point tensor (F16/BF16/F32/F64); `None` keeps each one's.
    pub dtype: Option<Dtype>,
    /// Worker threads for the arithmetic (`None`: all cores). The result does not depend on it.
    pub threads: Option<usize>,
    /// Replace an existing output (a file, or a directory holding only a model).
    pub force: bool,
    /// `(OLD, NEW)`: a module or tensor name of an adapter that starts with `OLD` is
    /// looked up in the base with `NEW` instead; the first matching pair applies.
    pub prefix_map: Vec<(String, String)>,
    /// Merge adapters holding NaN or infinite values, and keep weights that overflow to
    /// infinity, instead of refusing.
    pub allow_nonfinite: bool,
    /// Subtract the adapters' updates (unmerge) instead of adding them.
    pub subtract: bool,
    /// `fsync` every file before the final rename (durable on power loss).
    pub fsync: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            dtype: None,
            threads: None,
            force: false,
            prefix_map: vec![],
            allow_nonfinite: false,
            subtract: false,
            fsync: true,
        }
    }
}

/// The size of a merge, known once everything is checked.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Bytes of safetensors files to write.
    pub bytes: u64,
    /// Weights the adapters change (LoRA updates).
    pub modules: usize,
    pub files: usize,
}

/// Progress reports and cancellation, called on the thread that runs [`merge`].
pub trait Observer {
    fn start(&mut self, _totals: &Totals) {}
    /// `bytes` more written; `modules` more merged weights complete.
    fn advance(&mut self, _bytes: u64, _modules: usize) {}
    /// Polled between pieces of work: `true` stops the merge, which then removes
    /// everything it wrote and returns [`Error::Cancelled`].
    fn cancelled(&mut self) -> bool {
        false
    }
}

/// An observer that reports nothing and never cancels.
pub struct Silent;
impl Observer for Silent {}

/// What a merge did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    pub out: PathBuf,
    /// safetensors files written (file names).
    pub files: Vec<String>,
    /// Other files copied to the output directory (config, tokenizer, ...).
    pub copied_files: Vec<String>,
    /// Entries of the base directory not copied, and why.
    pub skipped: Vec<(String, String)>,
    /// Weights changed by LoRA updates.
    pub merged: usize,
    /// Adapter modules applied (counting each adapter).
    pub modules: usize,
    /// Tensors replaced by an adapter's full tensors (PEFT `modules_to_save`).
    pub replaced: usize,
    /// Tensors only converted to the output dtype.
    pub converted: usize,
    /// Tensors copied bit for bit.
    pub unchanged: usize,
    /// Bytes of safetensors written.
    pub bytes: u64,
    /// Values of the merged weights.
    pub merged_values: u64,
    /// Of those, values the f32 path could not prove correctly rounded and recomputed
    /// in f64 (see [`engine`]); every value is the exact result rounded once either way.
    pub recomputed: u64,
    /// Output values that are NaN or infinite where the input was finite (only with
    /// `allow_nonfinite`; otherwise the merge fails instead).
    pub nonfinite: u64,
    pub warnings: Vec<String>,
}

// ------------------------------------------------------------------------- plan

/// One adapter's update of a weight in the plan.
#[derive(Clone, Debug)]
struct TermRef {
    adapter: usize,
    module: ModuleTerm,
    /// weight x scale (x -1 to unmerge)
    coef: f64,
    /// The rows of one expert's block this tensor receives, when a fused expert
    /// parameter is stored one tensor per expert ([`split`]); `None`: the whole module.
    part: Option<split::Part>,
}

/// What happens to one tensor of the base.
#[derive(Clone, Debug)]
enum Job {
    Merge(Vec<TermRef>),
    Replace { adapter: usize, key: String },
}

fn map_name(name: &str, prefix_map: &[(String, String)]) -> String {
    for (old, new) in prefix_map {
        if let Some(rest) = name.strip_prefix(old.as_str()) {
            return format!("{new}{rest}");
        }
    }
    name.to_string()
}

/// A `--prefix-map` that would find `module`'s weight in the base, if one is evident:
/// the base weight sharing the longest tail of dot-separated components with it.
fn prefix_hint(module: &str, base: &BTreeMap<String, (usize, TensorInfo)>) -> Option<String> {
    let want: Vec<&str> = module.split('.').chain(["weight"]).collect();
    let mut best: Option<(usize, &str)> = None;
    for name in base.keys() {
        let have: Vec<&str> = name.split('.').collect();
        let common = want
            .iter()
            .rev()
            .zip(have.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        if common >= 3 && best.is_none_or(|(c, _)| common > c) {
            best = Some((common, name));
        }
    }
    let (common, name) = best?;
    let have: Vec<&str> = name.split('.').collect();
    let join = |parts: &[&str]| {
        let s = parts.join(".");
        if s.is_empty() {
            s
        } else {
            s + "."
        }
    };
    let old = join(&want[..want.len() - common]);
    let new = join(&have[..have.len() - common]);
    Some(format!("--prefix-map '{old}={new}' (e.g. {module} -> {name})"))
}

/// Why a base tensor of the wrong shape might be so, when it is evident.
fn shape_hint(place: &Placement, shape: &[usize]) -> &'static str {
    let [rows, cols] = place.block_shape();
    let flipped = match place.experts {
        Some(e) => shape == [e, cols, rows],
        None => shape == [cols, rows],
    };
    match (place.kind, place.transposed, flipped) {
        (_, _, false) => "",
        (ModuleKind::Linear, true, _) => " (the adapter says fan_in_fan_out, the base stores it d_out x d_in)",
        (ModuleKind::Linear, false, _) => {
            " (the base stores it transposed, d_in x d_out: an adapter for Conv1D needs fan_in_fan_out)"
        }
        (ModuleKind::Parameter, false, _) => {
            " (the base stores each block transposed, d_in x d_out, like gpt-oss's experts: the module needs \
             transposed = true; a PEFT directory does not record is_transposed (it is taken from the model type of \
             the base's config.json where known), so import it with import-peft and set transposed in the file)"
        }
        (ModuleKind::Parameter, true, _) => " (the adapter says transposed, the base stores each block d_out x d_in)",
        _ => "",
    }
}

/// Whether the base directory's `config.json` ties the output head to the input
/// embedding: `tie_word_embeddings: true`, or the key absent (transformers' default is
/// true) and no `lm_head.weight` stored. An unreadable config is not tied (the merge
/// does not need it).
fn head_is_tied(ck: &Checkpoint, config: Option<&serde_json::Value>) -> bool {
    let Some(config) = config else { return false };
    match config.get("tie_word_embeddings").and_then(serde_json::Value::as_bool) {
        Some(tied) => tied,
        None => !ck.tensors.contains_key("lm_head.weight"),
    }
}

/// The base directory's `config.json`, when there is one and it parses.
fn base_config(ck: &Checkpoint) -> Option<serde_json::Value> {
    if !ck.is_dir {
        return None;
    }
    let text = std::fs::read_to_string(ck.path.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// transformers model types whose experts module stores each expert's weight
/// transposed, `[E, d_in, d_out]` (its `is_transposed`, which PEFT's `ParamWrapper`
/// reads from the model and does not save).
const TRANSPOSED_EXPERTS: [&str; 3] = ["gpt_oss", "llama4", "llama4_text"];

/// Whether the base's experts are stored transposed (by its `config.json` model type).
fn experts_transposed(config: Option<&serde_json::Value>) -> bool {
    let model_type = config
        .and_then(|c| c.get("model_type"))
        .and_then(serde_json::Value::as_str);
    model_type.is_some_and(|t| TRANSPOSED_EXPERTS.contains(&t))
}

/// Whether two modules on one base tensor see it as the same blocks of the same shape.
fn same_blocks(a: &Placement, b: &Placement) -> bool {
    a.blocks() == b.blocks() && a.block_shape() == b.block_shape()
}

struct Plan {
    jobs: BTreeMap<String, Job>,
    modules: usize,
    warnings: Vec<String>,
}

fn build_plan(ck: &Checkpoint, adapters: &[Loaded], opts: &MergeOptions) -> Result<Plan> {
    let mut problems = vec![];
    let mut nonfinite = vec![];
    let mut missing: Vec<String> = vec![];
    let mut jobs: BTreeMap<String, Job> = BTreeMap::new();
    let mut modules = 0;
    let mut warnings = vec![];
    let sign = if opts.subtract { -1.0 } else { 1.0 };
    let config = base_config(ck);
    let transposed_experts = experts_transposed(config.as_ref());
    for (i, ad) in adapters.iter().enumerate() {
        warnings.extend(ad.warnings());
        let label = &ad.label;
        for mut m in ad.modules(i) {
            if m.b_interleaved && transposed_experts {
                // a PEFT directory's experts on a base that stores them transposed
                m.placement.transposed = true;
            }
            let place = &m.placement;
            let target = place.base_tensor(&map_name(&m.module, &opts.prefix_map));
            let pieces = if ck.tensors.contains_key(&target) {
                vec![(target, None)]
            } else if let Some(pieces) = split::per_expert_pieces(&target, place, |name| ck.tensors.contains_key(name))
            {
                pieces.into_iter().map(|p| (p.tensor, Some(p.part))).collect()
            } else {
                problems.push(format!(
                    "{label}: module {} has no {} {target} in the base{}",
                    m.module,
                    if place.kind == ModuleKind::Parameter {
                        "parameter"
                    } else {
                        "weight"
                    },
                    if place.experts.is_some() {
                        format!(" (nor {})", split::DESCRIPTION)
                    } else {
                        String::new()
                    }
                ));
                missing.push(m.module.clone());
                continue;
            };
            if !opts.allow_nonfinite {
                for key in std::iter::once(&m.b_key).chain(m.a_key()) {
                    let (ti, bytes) = ad.file().tensor(key)?;
                    let bad = count_nonfinite(Float::from_st(ti.dtype).expect("checked on open"), bytes);
                    if let Some(range) = ad.file().range(key) {
                        ad.file().release(range); // read again when merging: keep memory flat
                    }
                    if bad > 0 {
                        nonfinite.push(format!("{label}: {key} holds {bad} NaN or infinite value(s)"));
                    }
                }
            }
            let coef = sign * ad.input.weight * m.scale;
            modules += 1;
            if place.kind == ModuleKind::Embedding && head_is_tied(ck, config.as_ref()) {
                warnings.push(format!(
                    "{label}: module {} is an embedding and {} ties the output head to it (tie_word_embeddings): \
                     the merged checkpoint's head changes with it, while the adapted model's head kept the base \
                     embedding",
                    m.module,
                    ck.path.join("config.json").display()
                ));
            }
            for (target, part) in pieces {
                let info = &ck.tensors[&target].1;
                let expected = match &part {
                    Some(part) => vec![part.rows.len(), place.d_in],
                    None => place.base_shape(),
                };
                if info.shape != expected {
                    let what = match &part {
                        Some(p) => format!("{}, whose expert {} rows {:?}", place.describe(), p.block, p.rows),
                        None => place.describe(),
                    };
                    problems.push(format!(
                        "{label}: module {} is a {what}, so {target} in the base must have shape {expected:?}, but \
                         it has shape {:?}{}",
                        m.module,
                        info.shape,
                        if part.is_none() {
                            shape_hint(place, &info.shape)
                        } else {
                            ""
                        }
                    ));
                    continue;
                }
                if Float::from_st(info.dtype).is_none() {
                    problems.push(format!(
                        "{label}: module {}: {target} has dtype {}; only F16, BF16, F32 and F64 weights can be \
                         merged into (a quantised checkpoint?)",
                        m.module, info.dtype
                    ));
                    continue;
                }
                let term = TermRef {
                    adapter: i,
                    module: m.clone(),
                    coef,
                    part,
                };
                match jobs.entry(target.clone()).or_insert_with(|| Job::Merge(vec![])) {
                    Job::Merge(terms)
                        if terms
                            .first()
                            .is_some_and(|t| !same_blocks(&t.module.placement, place) || t.part != term.part) =>
                    {
                        problems.push(format!(
                            "{label}: module {} ({}) and module {} of {} ({}) both update {target} but split it \
                             into different blocks",
                            term.module.module,
                            place.describe(),
                            terms[0].module.module,
                            adapters[terms[0].adapter].label,
                            terms[0].module.placement.describe()
                        ))
                    }
                    Job::Merge(terms) => terms.push(term),
                    Job::Replace { adapter, .. } => problems.push(format!(
                        "{label}: module {} updates {target}, which {} replaces as a whole (modules_to_save)",
                        term.module.module, adapters[*adapter].label
                    )),
                }
            }
        }
        ad.file().release_all(); // the pages of the scan above (see release_all)
        for (name, key) in ad.full() {
            let target = map_name(&name, &opts.prefix_map);
            let (src, bytes) = ad.file().tensor(&key)?;
            if opts.subtract || ad.input.weight != 1.0 {
                problems.push(format!(
                    "{label}: the adapter replaces {target} as a whole (a full tensor, PEFT's modules_to_save), which \
                     cannot be {}; merge it alone with weight 1",
                    if opts.subtract { "unmerged" } else { "weighted" }
                ));
                continue;
            }
            let Some((_, info)) = ck.tensors.get(&target) else {
                problems.push(format!(
                    "{label}: full tensor {name} has no tensor {target} in the base to replace"
                ));
                missing.push(name.clone());
                continue;
            };
            if info.shape != src.shape {
                problems.push(format!(
                    "{label}: full tensor {name} has shape {:?}, but {target} in the base has shape {:?}",
                    src.shape, info.shape
                ));
                continue;
            }
            match (Float::from_st(src.dtype), Float::from_st(info.dtype)) {
                (Some(kind), Some(_)) => {
                    if !opts.allow_nonfinite {
                        let bad = count_nonfinite(kind, bytes);
                        if let Some(range) = ad.file().range(&key) {
                            ad.file().release(range);
                        }
                        if bad > 0 {
                            nonfinite.push(format!("{label}: {key} holds {bad} NaN or infinite value(s)"));
                        }
                    }
                }
                (None, None) if src.dtype == info.dtype => {}
                _ => {
                    problems.push(format!(
                        "{label}: full tensor {name} has dtype {}, which cannot replace {target} of dtype {}",
                        src.dtype, info.dtype
                    ));
                    continue;
                }
            }
            match jobs.get(&target) {
                None => {
                    jobs.insert(target, Job::Replace { adapter: i, key });
                }
                Some(Job::Merge(terms)) => problems.push(format!(
                    "{label}: full tensor {name} replaces {target}, which {} updates (module {})",
                    adapters[terms[0].adapter].label, terms[0].module.module
                )),
                Some(Job::Replace { adapter, .. }) => problems.push(format!(
                    "{label}: full tensor {name} replaces {target}, which {} replaces too",
                    adapters[*adapter].label
                )),
            }
        }
    }
    if !problems.is_empty() {
        let total = problems.len() + nonfinite.len();
        problems.extend(nonfinite);
        let mut message = format!(
            "{total} problem(s) between the adapter(s) and the base {}; nothing was written:{}",
            ck.path.display(),
            problem_list(&problems)
        );
        if let Some(hint) = missing.first().and_then(|m| prefix_hint(m, &ck.tensors)) {
            message.push_str(&format!(" (hint: names differ by a prefix; try {hint})"));
        }
        return Err(Error::Mismatch { message });
    }
    if !nonfinite.is_empty() {
        return Err(Error::NonFinite {
            message: format!(
                "the adapter(s) hold NaN or infinite values; nothing was written (pass --allow-nonfinite, or \
                 allow_nonfinite=True, to merge them anyway):{}",
                problem_list(&nonfinite)
            ),
        });
    }
    Ok(Plan {
        jobs,
        modules,
        warnings,
    })
}

// ------------------------------------------------------------------------- output checks

/// `path` made absolute with its existing parent resolved (the file itself may not exist).
fn resolved(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let parent = parent.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::io(
            path,
            std::io::Error::new(e.kind(), format!("the directory {} does not exist", parent.display())),
        ),
        _ => Error::io(parent, e),
    })?;
    Ok(match abs.file_name() {
        Some(name) => {
            let joined = parent.join(name);
            joined.canonicalize().unwrap_or(joined)
        }
        None => parent,
    })
}

fn check_output(out: &Path, ck: &Checkpoint, adapters: &[AdapterInput], force: bool) -> Result<()> {
    let exists = |m: &str| Error::Exists {
        path: out.to_path_buf(),
        message: m.to_string(),
    };
    let out_abs = resolved(out)?;
    let base_abs = resolved(&ck.path)?;
    if out_abs == base_abs {
        return Err(exists("is the base itself; the merge never writes into the base"));
    }
    if out_abs.starts_with(&base_abs) {
        return Err(exists(
            "is inside the base directory; the merge never writes into the base",
        ));
    }
    if base_abs.starts_with(&out_abs) {
        return Err(exists("holds the base; choose another output"));
    }
    for a in adapters {
        let a_abs = resolved(&a.path)?;
        if a_abs == out_abs || a_abs.starts_with(&out_abs) {
            return Err(exists(&format!(
                "holds the adapter {}; choose another output",
                a.path.display()
            )));
        }
    }
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !force {
        return Err(exists("already exists; pass --force (force=True) to replace it"));
    }
    if ck.is_dir {
        if !meta.is_dir() {
            return Err(exists(
                "exists and is not a directory; the output of a model directory is a directory",
            ));
        }
        let mut has_weights = false;
        let mut empty = true;
        for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
            let entry = entry.map_err(|e| Error::io(out, e))?;
            empty = false;
            if entry.file_type().map_err(|e| Error::io(out, e))?.is_dir() {
                return Err(exists(&format!(
                    "holds the directory {:?}; --force only replaces a model directory (files only): remove it yourself",
                    entry.file_name()
                )));
            }
            has_weights |= entry.file_name().to_string_lossy().ends_with(".safetensors");
        }
        if !empty && !has_weights {
            return Err(exists(
                "is not a model directory (no .safetensors file); --force only replaces a model: remove it yourself",
            ));
        }
    } else if meta.is_dir() {
        return Err(exists("is a directory; the output of a single-file base is a file"));
    }
    Ok(())
}

// ------------------------------------------------------------------------- entry point

/// Merges `adapters` into the checkpoint `base` and writes the result to `out` (a file
/// for a file base, a directory for a model directory). See the module docs.
pub fn merge(
    base: &Path,
    adapters: &[AdapterInput],
    out: &Path,
    opts: &MergeOptions,
    observer: &mut dyn Observer,
) -> Result<MergeReport> {
    AdapterInput::check_all(adapters)?;
    if opts.threads == Some(0) {
        return Err(Error::invalid(
            "threads",
            "must be at least 1 (or absent for all cores)",
        ));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::invalid("threads", format!("cannot start a thread pool: {e}")))?;

    let ck = Checkpoint::open(base)?;
    check_output(out, &ck, adapters, opts.force)?;
    let loaded: Vec<Loaded> = adapters.iter().map(Loaded::open).collect::<Result<_>>()?;
    let plan = build_plan(&ck, &loaded, opts)?;
    let mut report = writer::write(&ck, &loaded, &plan, out, opts, &pool, observer)?;
    report.modules = plan.modules;
    let mut warnings = ck.warnings.clone();
    warnings.extend(plan.warnings.iter().cloned());
    warnings.append(&mut report.warnings);
    report.warnings = warnings;
    report.skipped = ck.skipped.clone();
    Ok(report)
}

/// Output dtype of a tensor of dtype `dtype` under `--dtype`.
fn out_dtype(dtype: StDtype, target: Option<Dtype>) -> StDtype {
    match (Float::from_st(dtype), target) {
        (Some(_), Some(t)) => Float::from_dtype(t).to_st(),
        _ => dtype,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_arguments() {
        assert_eq!(
            AdapterInput::parse("a.safetensors").unwrap(),
            AdapterInput::new("a.safetensors", 1.0)
        );
        assert_eq!(
            AdapterInput::parse("a.safetensors:0.5").unwrap(),
            AdapterInput::new("a.safetensors", 0.5)
        );
        assert_eq!(
            AdapterInput::parse("dir/x:-2").unwrap(),
            AdapterInput::new("dir/x", -2.0)
        );
        assert!(AdapterInput::parse("a:inf").is_err());
        assert!(AdapterInput::parse("a:nan").is_err());
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("odd:name");
        std::fs::write(&odd, b"").unwrap();
        let whole = odd.to_str().unwrap();
        assert_eq!(AdapterInput::parse(whole).unwrap().path, odd);
        let real = dir.path().join("real");
        std::fs::write(&real, b"").unwrap();
        let err = AdapterInput::parse(&format!("{}:x", real.display())).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
    }

    #[test]
    fn prefix_maps() {
        assert_eq!(parse_prefix_map("a.=b.").unwrap(), ("a.".into(), "b.".into()));
        assert_eq!(parse_prefix_map("=model.").unwrap(), ("".into(), "model.".into()));
        assert!(parse_prefix_map("nothing").is_err());
        assert!(parse_prefix_map("x=x").is_err());
        let maps = vec![
            ("base.".to_string(), "".to_string()),
            ("".to_string(), "model.".to_string()),
        ];
        assert_eq!(map_name("base.layers.0", &maps), "layers.0");
        assert_eq!(map_name("layers.0", &maps), "model.layers.0");
    }

    #[test]
    fn prefix_hints() {
        let info = TensorInfo {
            dtype: StDtype::F32,
            shape: vec![2, 2],
        };
        let base: BTreeMap<String, (usize, TensorInfo)> = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
            .iter()
            .map(|n| (n.to_string(), (0, info.clone())))
            .collect();
        let hint = prefix_hint("layers.0.self_attn.q_proj", &base).unwrap();
        assert!(hint.starts_with("--prefix-map '=model.'"), "{hint}");
        let hint = prefix_hint("transformer.model.layers.0.self_attn.q_proj", &base).unwrap();
        assert!(hint.starts_with("--prefix-map 'transformer.='"), "{hint}");
        let hint = prefix_hint("decoder.layers.0.self_attn.q_proj", &base).unwrap();
        assert!(hint.starts_with("--prefix-map 'decoder.=model.'"), "{hint}");
        assert!(prefix_hint("something.else", &base).is_none());
    }
}
