//! Hugging Face PEFT LoRA adapter directories, read for merging (never unpickled).
//!
//! A directory holds `adapter_config.json` and `adapter_model.safetensors`. Module `m`
//! (a name from the base model's `named_modules()`) has `base_model.model.{m}.lora_A.weight`
//! (r x d_in) and `...lora_B.weight` (d_out x r); its update is `s * B @ A` with
//! `s = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, where `r` and `alpha` come
//! from `rank_pattern` / `alpha_pattern` (PEFT's rule: the first key, a regex, that
//! matches the end of the module name at a dot boundary) or else `r` / `lora_alpha`.
//! `fan_in_fan_out` means the base stores the weight transposed (GPT-2's `Conv1D`).
//! Tensors of `modules_to_save` replace the base model's tensors of the same name.
//!
//! Refused, with a message naming the reason: other PEFT methods, DoRA and the other
//! LoRA variants that change the computation, trained biases, embedding or convolution
//! LoRA, non-float (quantised) factors, a pickled `adapter_model.bin` only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::engine::Float;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
pub const PICKLE_WEIGHTS_NAME: &str = "adapter_model.bin";
/// The prefix `PeftModel.save_pretrained` gives every tensor key.
pub const KEY_PREFIX: &str = "base_model.model.";

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
    pub scale: f64,
}

/// An open, checked PEFT LoRA adapter directory.
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub file: SafetensorsFile,
    pub fan_in_fan_out: bool,
    pub use_rslora: bool,
    /// Module name (without `base_model.model.`) -> factors.
    pub modules: BTreeMap<String, PeftModule>,
    /// Tensors of `modules_to_save`: state-dict name in the base model -> key in the file.
    pub full: BTreeMap<String, String>,
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

/// A JSON object read with its keys in file order (PEFT's patterns are tried in order).
#[derive(Default)]
struct OrderedMap(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object or null")
            }
            fn visit_unit<E>(self) -> std::result::Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
            fn visit_none<E>(self) -> std::result::Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<OrderedMap, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<OrderedMap, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_option(V)
    }
}

#[derive(Deserialize)]
struct Patterns {
    #[serde(default)]
    rank_pattern: OrderedMap,
    #[serde(default)]
    alpha_pattern: OrderedMap,
}

/// PEFT's `get_pattern_key` rule, compiled: the first key whose regex matches the end
/// of the module name at a dot boundary.
struct PatternRule {
    keys: Vec<(String, Regex, Value)>,
}

impl PatternRule {
    fn new(map: OrderedMap, field: &str, config: &Path) -> Result<PatternRule> {
        let mut keys = vec![];
        for (key, value) in map.0 {
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                format_err(
                    config,
                    format!("{field}[{key:?}]"),
                    format!("not a regex asymlora can evaluate: {e}"),
                )
            })?;
            keys.push((key, re, value));
        }
        Ok(PatternRule { keys })
    }

    fn lookup(&self, module: &str) -> Option<(&str, &Value)> {
        self.keys
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map(|(k, _, v)| (k.as_str(), v))
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

fn positive_int(config: &BTreeMap<String, Value>, key: &str, default: usize, path: &Path) -> Result<usize> {
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

fn flag(config: &BTreeMap<String, Value>, key: &str, path: &Path) -> Result<bool> {
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

impl PeftAdapter {
    /// Opens and checks the PEFT adapter directory `dir`.
    pub fn open(dir: &Path) -> Result<PeftAdapter> {
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
        let config: BTreeMap<String, Value> = serde_json::from_str(&text)
            .map_err(|e| format_err(&config_path, "config", format!("not a JSON object: {e}")))?;
        let patterns: Patterns = serde_json::from_str(&text).map_err(|e| {
            format_err(
                &config_path,
                "rank_pattern/alpha_pattern",
                format!("must be objects: {e}"),
            )
        })?;

        match config.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(format_err(
                    &config_path,
                    "peft_type",
                    format!("is {other:?}; only LoRA adapters (peft_type \"LORA\") can be merged"),
                ))
            }
        }
        match config.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(v) => {
                return Err(format_err(
                    &config_path,
                    "bias",
                    format!("{v} trains biases of the base model; only bias \"none\" can be merged"),
                ))
            }
        }
        for (field, what) in UNSUPPORTED_FIELDS {
            if let Some(v) = config.get(field).filter(|v| truthy(v)) {
                return Err(format_err(
                    &config_path,
                    field,
                    format!("{v} enables {what}, which this merge does not support"),
                ));
            }
        }
        let mut warnings = vec![];
        let init = config.get("init_lora_weights").and_then(Value::as_str).unwrap_or("");
        if BASE_REWRITING_INITS.iter().any(|p| init.starts_with(p)) || config.get("loftq_config").is_some_and(truthy) {
            warnings.push(format!(
                "{}: init_lora_weights {init:?} rewrote the base weights when the adapter was created; the merge is \
                 right only on that rewritten base (or if the adapter was converted when saved)",
                dir.display()
            ));
        }

        let rank = positive_int(&config, "r", 8, &config_path)?;
        let alpha = match config.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => finite_number(v, &config_path, "lora_alpha")?,
        };
        let use_rslora = flag(&config, "use_rslora", &config_path)?;
        let fan_in_fan_out = flag(&config, "fan_in_fan_out", &config_path)?;
        let rank_rule = PatternRule::new(patterns.rank_pattern, "rank_pattern", &config_path)?;
        let alpha_rule = PatternRule::new(patterns.alpha_pattern, "alpha_pattern", &config_path)?;
        let saved: Vec<String> = match config.get("modules_to_save") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| format_err(&config_path, "modules_to_save", "must be a list of module names"))?,
            Some(v) => {
                return Err(format_err(
                    &config_path,
                    "modules_to_save",
                    format!("must be a list of module names, got {v}"),
                ))
            }
        };

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
        let file = SafetensorsFile::open(&weights).map_err(|e| match e {
            Error::Safetensors { message, .. } => format_err(&weights, "safetensors", format!("not valid: {message}")),
            other => other,
        })?;

        // Sort keys into factors per module and full tensors.
        let mut problems: Vec<String> = vec![];
        let mut factors: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
        let mut full: BTreeMap<String, String> = BTreeMap::new();
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
                let entry = factors.entry(module.to_string()).or_default();
                let slot = if which == 'A' { &mut entry.0 } else { &mut entry.1 };
                if slot.is_some() {
                    problems.push(format!(
                        "{key}: the factor is in the file twice (with and without prefix)"
                    ));
                }
                *slot = Some(key.to_string());
            } else if in_modules_to_save(name, &saved) {
                if full.insert(name.to_string(), key.to_string()).is_some() {
                    problems.push(format!(
                        "{key}: the tensor is in the file twice (with and without prefix)"
                    ));
                }
            } else {
                let hint = match named.captures(name) {
                    Some(c) => format!(
                        " (it carries the adapter name {:?}: a raw model state dict, not what \
                         PeftModel.save_pretrained writes)",
                        &c[1]
                    ),
                    None => " (neither a LoRA factor nor a tensor of modules_to_save)".into(),
                };
                problems.push(format!("{key}: unrecognised tensor name{hint}"));
            }
        }
        if factors.is_empty() && full.is_empty() && problems.is_empty() {
            problems.push("no LoRA factors (*.lora_A.weight / *.lora_B.weight) in the file".into());
        }

        let mut modules = BTreeMap::new();
        for (module, (a, b)) in factors {
            let (Some(a_key), Some(b_key)) = (a, b) else {
                problems.push(format!("{module}: lora_A.weight or lora_B.weight is missing"));
                continue;
            };
            let (ai, _) = file.tensor(&a_key)?;
            let (bi, _) = file.tensor(&b_key)?;
            let bad: Vec<String> = [ai.dtype, bi.dtype]
                .into_iter()
                .filter(|d| Float::from_st(*d).is_none())
                .map(|d| format!("{d:?}"))
                .collect();
            if !bad.is_empty() {
                problems.push(format!(
                    "{module}: factor dtype {} is not F16/BF16/F32/F64 (quantised LoRA factors are not supported)",
                    bad.join(", ")
                ));
                continue;
            }
            if ai.shape.len() != 2 || bi.shape.len() != 2 {
                problems.push(format!(
                    "{module}: factors of shape {:?} and {:?} are not matrices (convolution LoRA is not supported)",
                    ai.shape, bi.shape
                ));
                continue;
            }
            let (r, d_in, d_out, r_b) = (ai.shape[0], ai.shape[1], bi.shape[0], bi.shape[1]);
            if r != r_b || r == 0 || d_in == 0 || d_out == 0 {
                problems.push(format!(
                    "{module}: lora_A {:?} and lora_B {:?} do not form a rank-r product",
                    ai.shape, bi.shape
                ));
                continue;
            }
            let expected = match rank_rule.lookup(&module) {
                Some((key, v)) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    format_err(
                        &config_path,
                        format!("rank_pattern[{key:?}]"),
                        format!("must be an integer, got {v}"),
                    )
                })?,
                None => rank,
            };
            if r != expected {
                problems.push(format!(
                    "{module}: the factors have rank {r} but the config gives {expected} (r / rank_pattern); PEFT \
                     could not load this adapter"
                ));
                continue;
            }
            let module_alpha = match alpha_rule.lookup(&module) {
                Some((key, v)) => finite_number(v, &config_path, &format!("alpha_pattern[{key:?}]"))?,
                None => alpha,
            };
            let scale = if use_rslora {
                module_alpha / (r as f64).sqrt()
            } else {
                module_alpha / r as f64
            };
            modules.insert(
                module,
                PeftModule {
                    a_key,
                    b_key,
                    rank: r,
                    d_in,
                    d_out,
                    alpha: module_alpha,
                    scale,
                },
            );
        }
        if !problems.is_empty() {
            let total = problems.len();
            let mut message = problems.into_iter().take(10).collect::<Vec<_>>().join("; ");
            if total > 10 {
                message.push_str(&format!("; and {} more", total - 10));
            }
            return Err(format_err(&weights, "tensors", message));
        }
        Ok(PeftAdapter {
            dir: dir.to_path_buf(),
            file,
            fan_in_fan_out,
            use_rslora,
            modules,
            full,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_rule_matches_like_peft() {
        let map = OrderedMap(vec![
            ("q_proj".into(), Value::from(4)),
            ("layers.1.self_attn.v_proj".into(), Value::from(2)),
            ("^model.layers.2.*".into(), Value::from(16)),
        ]);
        let rule = PatternRule::new(map, "rank_pattern", Path::new("c.json")).unwrap();
        let get = |m: &str| rule.lookup(m).map(|(_, v)| v.as_u64().unwrap());
        assert_eq!(get("model.layers.0.self_attn.q_proj"), Some(4));
        assert_eq!(get("q_proj"), Some(4));
        assert_eq!(get("model.layers.0.self_attn.xq_proj"), None, "dot boundary");
        assert_eq!(get("model.layers.1.self_attn.v_proj"), Some(2));
        assert_eq!(get("model.layers.11.self_attn.v_proj"), None);
        assert_eq!(get("model.layers.2.mlp.up_proj"), Some(16));
        let first = OrderedMap(vec![("proj".into(), Value::from(1)), ("q_proj".into(), Value::from(2))]);
        let rule = PatternRule::new(first, "rank_pattern", Path::new("c.json")).unwrap();
        assert_eq!(rule.lookup("a.proj").map(|(k, _)| k), Some("proj"));
        assert_eq!(
            rule.lookup("a.q_proj").map(|(k, _)| k),
            Some("q_proj"),
            "the first matching key wins"
        );
    }

    #[test]
    fn ordered_map_keeps_file_order() {
        let p: Patterns = serde_json::from_str(r#"{"rank_pattern": {"b": 1, "a": 2}, "alpha_pattern": null}"#).unwrap();
        assert_eq!(
            p.rank_pattern.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert!(p.alpha_pattern.0.is_empty());
    }

    #[test]
    fn modules_to_save_rule() {
        let t = vec!["classifier".to_string(), "score".to_string()];
        assert!(in_modules_to_save("classifier.weight", &t));
        assert!(in_modules_to_save("model.score.bias", &t));
        assert!(!in_modules_to_save("classifier", &t));
        assert!(!in_modules_to_save("model.layers.0.q.weight", &t));
    }
}
