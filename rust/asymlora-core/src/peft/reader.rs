//! Opening and checking a PEFT LoRA adapter directory: the one reader behind the merge,
//! `import_peft` and the CLI, so a directory is accepted or refused alike everywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::pattern::{OrderedMap, PatternRule};
use super::{CONFIG_NAME, KEY_PREFIX, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME};
use crate::adapter::{ModuleKind, Placement, Scaling};
use crate::dtype::is_float;
use crate::error::{problem_list, Error, Result};
use crate::io::SafetensorsFile;

/// LoRA config fields that change what the adapter computes beyond `W + s B A` on
/// linear layers: field, what it enables.
const UNSUPPORTED_FIELDS: [(&str, &str); 11] = [
    ("use_dora", "DoRA (weight-decomposed LoRA)"),
    ("lora_bias", "a trained bias on lora_B"),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA), applied only after invocation tokens",
    ),
    ("use_qalora", "QA-LoRA (pooled inputs on quantised layers)"),
    (
        "layer_replication",
        "layer replication (changes the base model's layer stack)",
    ),
    ("trainable_token_indices", "trainable tokens (embedding deltas)"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
    ("arrow_config", "Arrow routing between adapters"),
    (
        "kasa_config",
        "KaSA (a learned singular-value diagonal and a truncated base weight)",
    ),
    ("monteclora_config", "MonteCLoRA (variational sampling)"),
    ("megatron_config", "Megatron parallel linear layers"),
];

/// Fields of [`UNSUPPORTED_FIELDS`] that PEFT writes as `true`/`false`.
const BOOLEAN_FIELDS: [&str; 3] = ["use_dora", "lora_bias", "use_qalora"];

/// `init_lora_weights` values whose initialisation rewrote the base weights.
const BASE_REWRITING_INITS: [&str; 5] = ["pissa", "olora", "corda", "loftq", "lora_ga"];

/// One adapted module of a PEFT adapter: a linear, embedding or conv layer (its
/// module name), or a parameter of `target_parameters` (its full parameter name).
#[derive(Clone, Debug)]
pub struct PeftModule {
    pub a_key: String,
    pub b_key: String,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub alpha: f64,
    /// `s` in `W + s B A`.
    pub scale: f64,
    pub kind: ModuleKind,
    /// Conv kernel size (empty otherwise).
    pub kernel: Vec<usize>,
    /// Experts of a 3-D parameter (`ParamWrapper` with `num_experts > 1`).
    pub experts: Option<usize>,
    /// `B` in `ParamWrapper`'s interleaved layout `(d_out, r * E)` (see [`crate::source`]).
    pub b_interleaved: bool,
}

impl PeftModule {
    /// Where the module's matrix sits in the base; `fan_in_fan_out` applies to linears only.
    /// A PEFT directory does not record a parameter's `is_transposed`: parameters are
    /// read as transformers stores Mixtral's and Qwen3-MoE's experts, `[E, d_out, d_in]`.
    pub fn placement(&self, fan_in_fan_out: bool) -> Placement {
        Placement {
            kind: self.kind,
            d_in: self.d_in,
            d_out: self.d_out,
            kernel: self.kernel.clone(),
            experts: self.experts,
            transposed: match self.kind {
                ModuleKind::Linear => fan_in_fan_out,
                ModuleKind::Embedding => true,
                ModuleKind::Conv | ModuleKind::Parameter => false,
            },
        }
    }
}

/// An open, checked PEFT LoRA adapter directory.
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub file: SafetensorsFile,
    /// Adapter-wide `r` and `lora_alpha` (modules may override them by pattern).
    pub rank: usize,
    pub alpha: f64,
    pub scaling: Scaling,
    /// The base stores the adapted weights transposed (GPT-2's `Conv1D`).
    pub fan_in_fan_out: bool,
    /// Module name (without `base_model.model.`) -> factors.
    pub modules: BTreeMap<String, PeftModule>,
    /// Tensors of `modules_to_save`: state-dict name in the base model -> key in the file.
    pub full: BTreeMap<String, String>,
    /// What the config says of the base model: `class` (from `auto_mapping`),
    /// `name_or_path`, `revision`, `fan_in_fan_out`.
    pub base_model: serde_json::Map<String, Value>,
    pub warnings: Vec<String>,
}

/// The PEFT adapter directory `path` stands for: the directory itself, or the
/// directory of an `adapter_model.safetensors` next to an `adapter_config.json`.
pub fn peft_dir(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        return Some(path.to_path_buf());
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    (path.file_name().is_some_and(|n| n == WEIGHTS_NAME) && parent.join(CONFIG_NAME).is_file())
        .then(|| parent.to_path_buf())
}

#[derive(Deserialize)]
struct Patterns {
    #[serde(default)]
    rank_pattern: OrderedMap,
    #[serde(default)]
    alpha_pattern: OrderedMap,
}

/// A pattern rule with the values of its keys.
struct PatternValues {
    field: &'static str,
    rule: PatternRule,
    values: Vec<Value>,
}

impl PatternValues {
    fn new(map: OrderedMap, field: &'static str, config: &Path) -> Result<PatternValues> {
        let (keys, values): (Vec<String>, Vec<Value>) = map.0.into_iter().unzip();
        let rule =
            PatternRule::new(keys).map_err(|e| format_err(config, format!("{field}[{:?}]", e.key), e.message))?;
        Ok(PatternValues { field, rule, values })
    }

    /// The matching key's location (for errors) and value, if a key matches.
    fn lookup(&self, module: &str) -> Option<(String, &Value)> {
        let i = self.rule.first_match(module)?;
        Some((format!("{}[{:?}]", self.field, self.rule.key(i)), &self.values[i]))
    }
}

fn format_err(path: &Path, location: impl Into<String>, message: impl Into<String>) -> Error {
    Error::AdapterFormat {
        path: path.display().to_string(),
        location: location.into(),
        message: message.into(),
    }
}

/// Python's truthiness of a JSON value (how PEFT reads these optional fields).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

type Config = BTreeMap<String, Value>;

fn positive_int(config: &Config, key: &str, default: usize, path: &Path) -> Result<usize> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or_else(|| format_err(path, key, format!("must be a positive integer, got {v}"))),
    }
}

fn finite_number(v: &Value, path: &Path, location: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format_err(path, location, format!("must be a finite number, got {v}")))
}

fn flag(config: &Config, key: &str, path: &Path) -> Result<bool> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format_err(path, key, format!("must be true or false, got {v}"))),
    }
}

/// Whether PEFT's `modules_to_save` rule (a module name ending with a target) owns `name`.
fn in_modules_to_save(name: &str, targets: &[String]) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    (1..parts.len()).any(|i| {
        let owner = parts[..i].join(".");
        targets.iter().any(|t| owner.ends_with(t.as_str()))
    })
}

/// Why a (prefix-stripped) tensor name is refused outright.
fn refused_key(name: &str) -> Option<&'static str> {
    if name.contains("lora_magnitude_vector") {
        return Some("a DoRA magnitude vector (DoRA adapters are not supported)");
    }
    if name.ends_with(".lora_B.bias") {
        return Some("a bias on lora_B (lora_bias is not supported)");
    }
    None
}

/// Reads `adapter_config.json` of `dir` (or explains why `dir` is not an adapter directory).
fn read_config(dir: &Path) -> Result<(PathBuf, String, Config)> {
    let config_path = dir.join(CONFIG_NAME);
    if !config_path.is_file() {
        let nested: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(CONFIG_NAME).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let message = if nested.is_empty() {
            format!("no {CONFIG_NAME}: not a PEFT adapter directory (nor an asymlora adapter file)")
        } else {
            format!(
                "no {CONFIG_NAME}, but adapters in the subdirectories {nested:?} (PEFT saves adapters with a \
                 non-default name there): pass one of them"
            )
        };
        return Err(format_err(dir, "directory", message));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: Config = serde_json::from_str(&text)
        .map_err(|e| format_err(&config_path, "config", format!("not a JSON object: {e}")))?;
    Ok((config_path, text, config))
}

/// Refuses other PEFT methods, trained biases and LoRA variants asymlora cannot hold.
fn check_method(config: &Config, config_path: &Path) -> Result<()> {
    match config.get("peft_type") {
        Some(Value::String(s)) if s == "LORA" => {}
        other => {
            let shown = other.map_or("missing".to_string(), |v| format!("is {v}"));
            return Err(format_err(
                config_path,
                "peft_type",
                format!("{shown}; asymlora reads only LoRA adapters (peft_type \"LORA\")"),
            ));
        }
    }
    match config.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(format_err(
                config_path,
                "bias",
                format!("{v} trains biases of the base model; asymlora reads only bias \"none\""),
            ))
        }
    }
    for (field, what) in UNSUPPORTED_FIELDS {
        // PEFT writes these as booleans: a string "false" is refused as a wrong type
        // (like every boolean field), not read as a truthy "enabled".
        if BOOLEAN_FIELDS.contains(&field) {
            flag(config, field, config_path)?;
        }
        if let Some(v) = config.get(field).filter(|v| truthy(v)) {
            return Err(format_err(
                config_path,
                field,
                format!("{v} enables {what}, which asymlora does not support"),
            ));
        }
    }
    Ok(())
}

/// A warning when the adapter's initialisation rewrote the base weights (PiSSA, ...).
fn base_rewrite_warning(config: &Config, dir: &Path) -> Option<String> {
    let init = config.get("init_lora_weights").and_then(Value::as_str).unwrap_or("");
    let rewrote =
        BASE_REWRITING_INITS.iter().any(|p| init.starts_with(p)) || config.get("loftq_config").is_some_and(truthy);
    rewrote.then(|| {
        format!(
            "{}: init_lora_weights {init:?} rewrote the base weights when the adapter was created; the adapter is right \
             only on that rewritten base (or if it was converted when saved)",
            dir.display()
        )
    })
}

fn modules_to_save(config: &Config, config_path: &Path) -> Result<Vec<String>> {
    match config.get("modules_to_save") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| format_err(config_path, "modules_to_save", "must be a list of module names")),
        Some(v) => Err(format_err(
            config_path,
            "modules_to_save",
            format!("must be a list of module names, got {v}"),
        )),
    }
}

/// What the config records of the base model, in the adapter format's `base_model` words.
fn base_model(config: &Config, fan_in_fan_out: bool) -> serde_json::Map<String, Value> {
    let mut base = serde_json::Map::new();
    let class = config
        .get("auto_mapping")
        .and_then(|m| m.get("base_model_class"))
        .and_then(Value::as_str);
    if let Some(class) = class {
        base.insert("class".into(), class.into());
    }
    for (field, ours) in [("base_model_name_or_path", "name_or_path"), ("revision", "revision")] {
        if let Some(value) = config.get(field).and_then(Value::as_str).filter(|s| !s.is_empty()) {
            base.insert(ours.into(), value.into());
        }
    }
    base.insert("fan_in_fan_out".into(), fan_in_fan_out.into());
    base
}

fn open_weights(dir: &Path) -> Result<SafetensorsFile> {
    let weights = dir.join(WEIGHTS_NAME);
    if !weights.is_file() {
        let message = if dir.join(PICKLE_WEIGHTS_NAME).exists() {
            format!(
                "only {PICKLE_WEIGHTS_NAME}, a pickle, which asymlora never loads (unpickling can run arbitrary \
                 code); re-save the adapter with save_pretrained(..., safe_serialization=True)"
            )
        } else {
            format!("no {WEIGHTS_NAME}")
        };
        return Err(format_err(dir, "weights", message));
    }
    SafetensorsFile::open(&weights).map_err(|e| match e {
        Error::Safetensors { message, .. } => format_err(
            &weights,
            "safetensors",
            format!("not a valid safetensors file: {message}"),
        ),
        other => other,
    })
}

/// The factors of one wrapper module, by key.
#[derive(Default)]
struct FactorKeys {
    a: Option<String>,
    b: Option<String>,
    /// `lora_embedding_A` / `lora_embedding_B` (an `nn.Embedding`'s LoRA).
    embedding: bool,
}

/// The file's tensors sorted into LoRA factors per wrapper module (a name that may end
/// in `.base_layer` for nested `ParamWrapper`s) and full tensors; what fits neither goes
/// to `problems`.
#[derive(Default)]
struct Keys {
    factors: BTreeMap<String, FactorKeys>,
    full: BTreeMap<String, String>,
    /// `{module}.base_layer.weight` keys: embedding weights `save_embedding_layers` copied.
    base_weights: BTreeMap<String, String>,
}

/// `(module, 'A' | 'B', embedding?)` of a factor key (prefix stripped).
fn factor_of(name: &str) -> Option<(&str, char, bool)> {
    [
        (".lora_A.weight", 'A', false),
        (".lora_B.weight", 'B', false),
        (".lora_embedding_A", 'A', true),
        (".lora_embedding_B", 'B', true),
    ]
    .into_iter()
    .find_map(|(suffix, which, embedding)| name.strip_suffix(suffix).map(|m| (m, which, embedding)))
    .filter(|(m, _, _)| !m.is_empty())
}

fn classify_keys(file: &SafetensorsFile, saved: &[String], problems: &mut Vec<String>) -> Keys {
    let mut keys = Keys::default();
    let named = Regex::new(r"\.lora_[AB]\.([^.]+)\.weight$").expect("valid regex");
    for key in file.tensor_names() {
        let name = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
        if let Some(why) = refused_key(name) {
            problems.push(format!("{key}: {why}"));
            continue;
        }
        if let Some((module, which, embedding)) = factor_of(name) {
            let entry = keys.factors.entry(module.to_string()).or_default();
            let slot = if which == 'A' { &mut entry.a } else { &mut entry.b };
            if slot.is_some() {
                problems.push(format!(
                    "{key}: the factor is in the file twice (with and without prefix, or as lora_A/B and \
                     lora_embedding_A/B)"
                ));
            }
            *slot = Some(key.to_string());
            entry.embedding |= embedding;
        } else if in_modules_to_save(name, saved) {
            let dtype = file.tensor(key).map(|(info, _)| info.dtype).ok();
            if dtype.is_some_and(|d| !is_float(d) && !is_integer(d)) {
                problems.push(format!(
                    "{key}: dtype {} is neither a float nor an integer dtype",
                    dtype.expect("checked")
                ));
            } else if keys.full.insert(name.to_string(), key.to_string()).is_some() {
                problems.push(format!(
                    "{key}: the tensor is in the file twice (with and without prefix)"
                ));
            }
        } else if let Some(module) = name.strip_suffix(".base_layer.weight") {
            keys.base_weights.insert(module.to_string(), key.to_string());
        } else {
            let hint = match named.captures(name) {
                Some(c) => format!(
                    " (it carries the adapter name {:?}: a raw model state dict, not what PeftModel.save_pretrained \
                     writes)",
                    &c[1]
                ),
                None => " (neither a LoRA factor nor a tensor of modules_to_save)".into(),
            };
            problems.push(format!("{key}: unrecognised tensor name{hint}"));
        }
    }
    if keys.factors.is_empty() && problems.is_empty() {
        problems.push("no LoRA factors (*.lora_A.weight / *.lora_B.weight) in the file".into());
    }
    keys
}

/// A wrapper module name without its trailing `.base_layer`s, and how many there were
/// (PEFT nests one `ParamWrapper` per targeted parameter of a module).
fn unwrap_base_layers(module: &str) -> (&str, usize) {
    let mut m = module;
    let mut depth = 0;
    while let Some(inner) = m.strip_suffix(".base_layer") {
        m = inner;
        depth += 1;
    }
    (m, depth)
}

/// Parameters of `module` that `target_parameters` names, in the config's order: entry
/// `e` names parameter `p` of `module` when `{module}.{p}` is `e` or ends with `.{e}`
/// (PEFT's rule).
fn targeted_parameters(module: &str, targets: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for entry in targets {
        let (prefix, param) = match entry.rsplit_once('.') {
            Some((prefix, param)) => (prefix, param),
            None => ("", entry.as_str()),
        };
        let matches = prefix.is_empty() || module == prefix || module.ends_with(&format!(".{prefix}"));
        if matches && !param.is_empty() && !out.iter().any(|p| p == param) {
            out.push(param.to_string());
        }
    }
    out
}

fn target_parameters(config: &Config, config_path: &Path) -> Result<Vec<String>> {
    match config.get("target_parameters") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| format_err(config_path, "target_parameters", "must be a list of parameter names")),
        Some(v) => Err(format_err(
            config_path,
            "target_parameters",
            format!("must be a list of parameter names, got {v}"),
        )),
    }
}

/// PEFT's `target_modules` rule: a list entry names a module equal to it or ending in
/// `.{entry}`; a string is a regex the whole name must match.
struct TargetModules {
    names: Vec<String>,
    regex: Option<Regex>,
    all_linear: bool,
}

impl TargetModules {
    fn read(config: &Config, config_path: &Path) -> Result<TargetModules> {
        let mut t = TargetModules {
            names: vec![],
            regex: None,
            all_linear: false,
        };
        match config.get("target_modules") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "all-linear" => t.all_linear = true,
            Some(Value::String(s)) => {
                t.regex = Some(Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    format_err(
                        config_path,
                        "target_modules",
                        format!("not a regex PEFT could match: {e}"),
                    )
                })?)
            }
            Some(Value::Array(items)) => {
                t.names = items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
            }
            Some(v) => {
                return Err(format_err(
                    config_path,
                    "target_modules",
                    format!("must be a list of module names or a regex, got {v}"),
                ))
            }
        }
        Ok(t)
    }

    fn matches(&self, module: &str) -> bool {
        self.all_linear
            || self.regex.as_ref().is_some_and(|r| r.is_match(module))
            || self
                .names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// What one wrapper module's factors adapt: its own weight (a layer), or a parameter.
enum Target {
    Layer { module: String, embedding: bool },
    Parameter { name: String },
}

/// Pairs each wrapper module with what it adapts. Nested `ParamWrapper`s of one module
/// wrap its targeted parameters in the module's parameter order, the last outermost;
/// that order is taken to be [`super::PARAMETER_ORDER`].
fn resolve_targets(
    factors: &BTreeMap<String, FactorKeys>,
    targets: &[String],
    layers: &TargetModules,
    problems: &mut Vec<String>,
) -> BTreeMap<String, Target> {
    // A module of target_modules is a layer (its own LoRA); PEFT wraps its parameters
    // only around it, under .base_layer.
    let is_layer = |wrapper: &str, keys: &FactorKeys| {
        let (module, depth) = unwrap_base_layers(wrapper);
        keys.embedding || (depth == 0 && layers.matches(module)) || targeted_parameters(module, targets).is_empty()
    };
    let mut depths: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (wrapper, keys) in factors {
        if !is_layer(wrapper, keys) {
            let (module, depth) = unwrap_base_layers(wrapper);
            depths.entry(module).or_default().push(depth);
        }
    }
    let mut out = BTreeMap::new();
    for (wrapper, keys) in factors {
        let (module, depth) = unwrap_base_layers(wrapper);
        let params = targeted_parameters(module, targets);
        if is_layer(wrapper, keys) {
            if depth > 0 {
                problems.push(format!(
                    "{wrapper}: LoRA factors on a nested base_layer, but no entry of target_parameters names a \
                     parameter of {module}"
                ));
                continue;
            }
            out.insert(
                wrapper.clone(),
                Target::Layer {
                    module: module.to_string(),
                    embedding: keys.embedding,
                },
            );
            continue;
        }
        let mut params = params;
        super::sort_parameters(&mut params);
        let n = depths[module].len();
        let contiguous = (0..n).all(|d| depths[module].contains(&d));
        if params.len() != n || !contiguous {
            problems.push(format!(
                "{module}: {n} nested ParamWrapper(s) in the file but target_parameters names {} parameter(s) of it \
                 ({}): cannot tell which parameter each adapts",
                params.len(),
                params.join(", ")
            ));
            continue;
        }
        // depth 0 (outermost) wraps the last parameter
        let param = &params[n - 1 - depth];
        out.insert(
            wrapper.clone(),
            Target::Parameter {
                name: format!("{module}.{param}"),
            },
        );
    }
    out
}

/// Integer and boolean dtypes (counters such as BatchNorm's `num_batches_tracked`).
pub fn is_integer(dtype: safetensors::Dtype) -> bool {
    use safetensors::Dtype as St;
    matches!(
        dtype,
        St::BOOL | St::U8 | St::I8 | St::U16 | St::I16 | St::U32 | St::I32 | St::U64 | St::I64
    )
}

/// Everything the config says about ranks and alphas.
struct RankRules {
    rank: usize,
    alpha: f64,
    scaling: Scaling,
    ranks: PatternValues,
    alphas: PatternValues,
}

impl RankRules {
    fn read(config: &Config, text: &str, config_path: &Path) -> Result<RankRules> {
        let patterns: Patterns = serde_json::from_str(text).map_err(|e| {
            format_err(
                config_path,
                "rank_pattern/alpha_pattern",
                format!("must be objects: {e}"),
            )
        })?;
        let alpha = match config.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => finite_number(v, config_path, "lora_alpha")?,
        };
        Ok(RankRules {
            rank: positive_int(config, "r", 8, config_path)?,
            alpha,
            scaling: Scaling::from_rslora(flag(config, "use_rslora", config_path)?),
            ranks: PatternValues::new(patterns.rank_pattern, "rank_pattern", config_path)?,
            alphas: PatternValues::new(patterns.alpha_pattern, "alpha_pattern", config_path)?,
        })
    }

    fn rank(&self, module: &str, config_path: &Path) -> Result<usize> {
        match self.ranks.lookup(module) {
            Some((at, v)) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| format_err(config_path, at, format!("must be an integer, got {v}"))),
            None => Ok(self.rank),
        }
    }

    fn alpha(&self, module: &str, config_path: &Path) -> Result<f64> {
        match self.alphas.lookup(module) {
            Some((at, v)) => finite_number(v, config_path, &at),
            None => Ok(self.alpha),
        }
    }
}

/// The rank-r product a module's factors form: `(r, d_in, d_out, kernel)`, or why not.
/// `A` is `(r, d_in)`, or `(r, c_in, *kernel)` for a conv with `B` `(d_out, r, 1, ...)`.
fn factor_dims(
    module: &str,
    a: &[usize],
    b: &[usize],
) -> std::result::Result<(usize, usize, usize, Vec<usize>), String> {
    let not_product = || format!("{module}: lora_A {a:?} and lora_B {b:?} do not form a rank-r product");
    if a.len() < 2 || a.len() > 5 || b.len() != a.len() {
        return Err(not_product());
    }
    let kernel = a[2..].to_vec();
    if b[2..].iter().any(|&k| k != 1) {
        return Err(format!(
            "{module}: a conv lora_B {b:?} with a kernel other than 1 is not a LoRA PEFT writes"
        ));
    }
    let (r, d_out, r_b) = (a[0], b[0], b[1]);
    let d_in = a[1..].iter().product::<usize>();
    if r != r_b || r == 0 || d_in == 0 || d_out == 0 {
        return Err(not_product());
    }
    Ok((r, d_in, d_out, kernel))
}

/// Checks one module's factors against each other and the config.
fn check_module(
    file: &SafetensorsFile,
    target: &Target,
    a_key: String,
    b_key: String,
    rules: &RankRules,
    config_path: &Path,
) -> Result<std::result::Result<(String, PeftModule), String>> {
    let module = match target {
        Target::Layer { module, .. } => module.as_str(),
        Target::Parameter { name } => name.as_str(),
    };
    let (ai, _) = file.tensor(&a_key)?;
    let (bi, _) = file.tensor(&b_key)?;
    let bad: Vec<String> = [ai.dtype, bi.dtype]
        .into_iter()
        .filter(|d| !is_float(*d))
        .map(|d| d.to_string())
        .collect();
    if !bad.is_empty() {
        return Ok(Err(format!(
            "{module}: factor dtype {} is not F16/BF16/F32/F64 (quantised LoRA factors are not supported)",
            bad.join(", ")
        )));
    }
    let embedding = matches!(target, Target::Layer { embedding: true, .. });
    let dims = match target {
        Target::Layer { .. } if !embedding => factor_dims(module, &ai.shape, &bi.shape),
        // an embedding's and a ParamWrapper's factors are matrices
        _ if ai.shape.len() != 2 || bi.shape.len() != 2 => Err(format!(
            "{module}: factors of shape {:?} and {:?} are not matrices",
            ai.shape, bi.shape
        )),
        _ => factor_dims(module, &ai.shape, &bi.shape),
    };
    let (rows, d_in, d_out, kernel) = match dims {
        Ok(d) => d,
        Err(problem) => return Ok(Err(problem)),
    };
    let expected = rules.rank(module, config_path)?;
    // A ParamWrapper's factors have E * r rows (columns of B): E experts of rank r.
    let (r, experts) = match target {
        Target::Parameter { .. } if rows % expected == 0 && rows / expected > 1 => (expected, Some(rows / expected)),
        _ => (rows, None),
    };
    if r != expected {
        return Ok(Err(format!(
            "{module}: the factors have rank {r} but the config gives {expected} (r / rank_pattern); PEFT could not \
             load this adapter"
        )));
    }
    let alpha = rules.alpha(module, config_path)?;
    let kind = match target {
        Target::Layer { embedding: true, .. } => ModuleKind::Embedding,
        Target::Layer { .. } if !kernel.is_empty() => ModuleKind::Conv,
        Target::Layer { .. } => ModuleKind::Linear,
        Target::Parameter { .. } => ModuleKind::Parameter,
    };
    Ok(Ok((
        module.to_string(),
        PeftModule {
            a_key,
            b_key,
            rank: r,
            d_in,
            d_out,
            alpha,
            scale: rules.scaling.scale(alpha, r),
            kind,
            kernel,
            experts,
            b_interleaved: experts.is_some(),
        },
    )))
}

impl PeftAdapter {
    /// Opens and checks the PEFT adapter directory `dir`. Errors are
    /// [`Error::AdapterFormat`] naming the file and field (or every bad tensor), or
    /// [`Error::Io`] when `dir` cannot be read.
    pub fn open(dir: &Path) -> Result<PeftAdapter> {
        let (config_path, text, config) = read_config(dir)?;
        check_method(&config, &config_path)?;
        let warnings: Vec<String> = base_rewrite_warning(&config, dir).into_iter().collect();
        let rules = RankRules::read(&config, &text, &config_path)?;
        let fan_in_fan_out = flag(&config, "fan_in_fan_out", &config_path)?;
        let saved = modules_to_save(&config, &config_path)?;
        let file = open_weights(dir)?;

        let params = target_parameters(&config, &config_path)?;
        let mut problems = vec![];
        let mut warnings = warnings;
        let keys = classify_keys(&file, &saved, &mut problems);
        let layers = TargetModules::read(&config, &config_path)?;
        let targets = resolve_targets(&keys.factors, &params, &layers, &mut problems);
        let mut modules = BTreeMap::new();
        for (wrapper, factors) in keys.factors {
            let Some(target) = targets.get(&wrapper) else {
                continue; // a problem is already recorded
            };
            let (Some(a_key), Some(b_key)) = (factors.a.clone(), factors.b.clone()) else {
                let (a, b) = if factors.embedding {
                    ("lora_embedding_A", "lora_embedding_B")
                } else {
                    ("lora_A.weight", "lora_B.weight")
                };
                let missing = if factors.a.is_none() { a } else { b };
                problems.push(format!("{wrapper}: {missing} is missing"));
                continue;
            };
            match check_module(&file, target, a_key, b_key, &rules, &config_path)? {
                Ok((name, m)) => {
                    if modules.insert(name.clone(), m).is_some() {
                        problems.push(format!("{name}: adapted twice"));
                    }
                }
                Err(problem) => problems.push(problem),
            }
        }
        for (module, key) in &keys.base_weights {
            match modules.get(module) {
                Some(m) if m.kind == ModuleKind::Embedding => warnings.push(format!(
                    "{}: {key} is a copy of the base embedding weight (PEFT's save_embedding_layers); the merge and \
                     the import use the base model's own {module}.weight",
                    dir.display()
                )),
                _ => problems.push(format!(
                    "{key}: unrecognised tensor name (a base_layer weight of a module without embedding LoRA)"
                )),
            }
        }
        if !problems.is_empty() {
            let message = format!("{} problem(s):{}", problems.len(), problem_list(&problems));
            return Err(format_err(file.path(), "tensors", message));
        }
        Ok(PeftAdapter {
            dir: dir.to_path_buf(),
            file,
            rank: rules.rank,
            alpha: rules.alpha,
            scaling: rules.scaling,
            fan_in_fan_out,
            modules,
            full: keys.full,
            base_model: base_model(&config, fan_in_fan_out),
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_to_save_rule() {
        let t = vec!["classifier".to_string(), "score".to_string()];
        assert!(in_modules_to_save("classifier.weight", &t));
        assert!(in_modules_to_save("model.score.bias", &t));
        assert!(!in_modules_to_save("classifier", &t));
        assert!(!in_modules_to_save("model.layers.0.q.weight", &t));
    }
}
