//! Opening and checking a PEFT LoRA adapter directory: the one reader behind the merge,
//! `import_peft` and the CLI, so a directory is accepted or refused alike everywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::pattern::{OrderedMap, PatternRule};
use super::{CONFIG_NAME, KEY_PREFIX, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME};
use crate::adapter::Scaling;
use crate::dtype::is_float;
use crate::error::{problem_list, Error, Result};
use crate::io::SafetensorsFile;

/// LoRA config fields that change what the adapter computes beyond `W + s B A` on
/// linear layers: field, what it enables.
const UNSUPPORTED_FIELDS: [(&str, &str); 12] = [
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
    ("target_parameters", "LoRA on bare parameters (target_parameters)"),
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

/// One adapted module of a PEFT adapter.
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
    if name
        .split('.')
        .any(|p| p == "lora_embedding_A" || p == "lora_embedding_B")
    {
        return Some("embedding LoRA (LoRA on nn.Embedding is not supported)");
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

/// The file's tensors sorted into LoRA factors per module (`(A key, B key)`) and full
/// tensors; what fits neither goes to `problems`.
#[derive(Default)]
struct Keys {
    factors: BTreeMap<String, (Option<String>, Option<String>)>,
    full: BTreeMap<String, String>,
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
        let factor = name
            .strip_suffix(".lora_A.weight")
            .map(|m| (m, 'A'))
            .or_else(|| name.strip_suffix(".lora_B.weight").map(|m| (m, 'B')));
        if let Some((module, which)) = factor.filter(|(m, _)| !m.is_empty()) {
            let entry = keys.factors.entry(module.to_string()).or_default();
            let slot = if which == 'A' { &mut entry.0 } else { &mut entry.1 };
            if slot.is_some() {
                problems.push(format!(
                    "{key}: the factor is in the file twice (with and without prefix)"
                ));
            }
            *slot = Some(key.to_string());
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

/// Checks one module's factors against each other and the config.
fn check_module(
    file: &SafetensorsFile,
    module: &str,
    a_key: String,
    b_key: String,
    rules: &RankRules,
    config_path: &Path,
) -> Result<std::result::Result<PeftModule, String>> {
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
    if ai.shape.len() != 2 || bi.shape.len() != 2 {
        return Ok(Err(format!(
            "{module}: factors of shape {:?} and {:?} are not matrices (convolution LoRA is not supported)",
            ai.shape, bi.shape
        )));
    }
    let (r, d_in, d_out, r_b) = (ai.shape[0], ai.shape[1], bi.shape[0], bi.shape[1]);
    if r != r_b || r == 0 || d_in == 0 || d_out == 0 {
        return Ok(Err(format!(
            "{module}: lora_A {:?} and lora_B {:?} do not form a rank-r product",
            ai.shape, bi.shape
        )));
    }
    let expected = rules.rank(module, config_path)?;
    if r != expected {
        return Ok(Err(format!(
            "{module}: the factors have rank {r} but the config gives {expected} (r / rank_pattern); PEFT could not \
             load this adapter"
        )));
    }
    let alpha = rules.alpha(module, config_path)?;
    Ok(Ok(PeftModule {
        a_key,
        b_key,
        rank: r,
        d_in,
        d_out,
        alpha,
        scale: rules.scaling.scale(alpha, r),
    }))
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

        let mut problems = vec![];
        let keys = classify_keys(&file, &saved, &mut problems);
        let mut modules = BTreeMap::new();
        for (module, (a, b)) in keys.factors {
            let (Some(a_key), Some(b_key)) = (a, b) else {
                problems.push(format!("{module}: lora_A.weight or lora_B.weight is missing"));
                continue;
            };
            match check_module(&file, &module, a_key, b_key, &rules, &config_path)? {
                Ok(m) => {
                    modules.insert(module, m);
                }
                Err(problem) => problems.push(problem),
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
