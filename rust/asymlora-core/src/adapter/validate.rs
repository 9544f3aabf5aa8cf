//! Checks shared by reading and writing: the metadata header and the config
//! against the tensors actually present. Every error names the module and field.

use std::collections::{BTreeMap, HashMap};

use safetensors::Dtype as StDtype;

use super::config::{
    AdapterConfig, ModuleConfig, ModuleKind, FORMAT_NAME, FORMAT_VERSION, META_CONFIG, META_FORMAT, META_VERSION,
};
use super::{lora_a_name, lora_b_name};
use crate::error::{Error, Result};
use crate::orthogonal::Generator;

pub use crate::io::TensorInfo;

const FACTOR_DTYPES: [StDtype; 4] = [StDtype::F16, StDtype::BF16, StDtype::F32, StDtype::F64];

/// Most elements (`rank * d_in`) a regenerated `A` may have. Its `d_in` is the one
/// config number no tensor in the file bounds (a stored factor's shape is checked
/// against the file length), and generating `A` allocates `rank * d_in` values: an
/// unchecked `d_in` of 2^40 would abort the process. 2^30 is far above any real layer
/// (rank 4096 on a 262144-wide input).
pub(crate) const MAX_GENERATED_A_ELEMENTS: usize = 1 << 30;

/// Builds format errors for one file.
pub(crate) struct Reporter<'a> {
    pub path: &'a str,
}

impl Reporter<'_> {
    pub fn err(&self, location: impl Into<String>, message: impl Into<String>) -> Error {
        Error::AdapterFormat {
            path: self.path.to_string(),
            location: location.into(),
            message: message.into(),
        }
    }
}

/// Reads and checks `format`, `format_version` and the JSON config from `__metadata__`.
pub(crate) fn config_from_metadata(rep: &Reporter<'_>, metadata: &BTreeMap<String, String>) -> Result<AdapterConfig> {
    let meta = Some(metadata).filter(|m| !m.is_empty()).ok_or_else(|| {
        rep.err(
            "__metadata__",
            "missing: not an asymlora adapter (a PEFT adapter or a plain checkpoint has no asymlora metadata)",
        )
    })?;
    match meta.get(META_FORMAT).map(String::as_str) {
        Some(FORMAT_NAME) => {}
        Some(other) => {
            return Err(rep.err(
                "__metadata__.format",
                format!("is {other:?}, expected {FORMAT_NAME:?}: not an asymlora adapter"),
            ))
        }
        None => return Err(rep.err("__metadata__.format", "missing: not an asymlora adapter")),
    }
    match meta.get(META_VERSION).map(String::as_str) {
        Some(FORMAT_VERSION) => {}
        Some(other) => {
            return Err(rep.err(
                "__metadata__.format_version",
                format!(
                    "{other:?} is not supported by this asymlora (it reads version {FORMAT_VERSION}); upgrade asymlora"
                ),
            ))
        }
        None => return Err(rep.err("__metadata__.format_version", "missing")),
    }
    let json = meta
        .get(META_CONFIG)
        .ok_or_else(|| rep.err(format!("__metadata__.{META_CONFIG}"), "missing"))?;
    AdapterConfig::from_json(json)
        .map_err(|e| rep.err(format!("__metadata__.{META_CONFIG}"), format!("invalid config: {e}")))
}

/// Checks the config on its own, then against `tensors`.
pub(crate) fn validate(
    rep: &Reporter<'_>,
    config: &AdapterConfig,
    tensors: &BTreeMap<String, TensorInfo>,
) -> Result<()> {
    check_config(rep, config)?;
    validate_tensors(rep, config, tensors)
}

/// Checks `config` on its own (not against tensors); errors name `path` and the field.
pub fn validate_config(path: &str, config: &AdapterConfig) -> Result<()> {
    check_config(&Reporter { path }, config)
}

fn check_config(rep: &Reporter<'_>, config: &AdapterConfig) -> Result<()> {
    config
        .generator
        .parse::<Generator>()
        .map_err(|e| rep.err("config.generator", inner_message(e)))?;
    if config.rank == 0 {
        return Err(rep.err("config.rank", "must be at least 1"));
    }
    if !config.alpha.is_finite() {
        return Err(rep.err("config.alpha", format!("must be finite, got {}", config.alpha)));
    }
    if !config.a_gain.is_finite() || config.a_gain == 0.0 {
        return Err(rep.err(
            "config.a_gain",
            format!("must be finite and non-zero, got {}", config.a_gain),
        ));
    }
    if config.base_model.as_ref().is_some_and(|b| !b.is_object()) {
        return Err(rep.err("config.base_model", "must be a JSON object when present"));
    }
    if config.modules.is_empty() {
        return Err(rep.err("config.modules", "is empty: an adapter adapts at least one module"));
    }
    // Non-stored modules' stream ranges [stream, stream + blocks), to check for overlaps.
    let mut ranges: Vec<(u128, u128, &str)> = vec![];
    for (name, m) in &config.modules {
        let at = |field: &str| format!("module {name:?}: {field}");
        if name.is_empty() {
            return Err(rep.err("config.modules", "a module name is empty"));
        }
        if m.d_in == 0 || m.d_out == 0 {
            return Err(rep.err(
                at("d_in/d_out"),
                format!("must be positive, got {} x {}", m.d_out, m.d_in),
            ));
        }
        check_kind_fields(rep, name, m)?;
        let r = config.module_rank(m);
        if r == 0 {
            return Err(rep.err(at("rank"), "must be at least 1"));
        }
        if m.alpha.is_some_and(|a| !a.is_finite()) {
            return Err(rep.err(at("alpha"), "must be finite"));
        }
        if !m.a_stored {
            if r > m.d_in {
                return Err(rep.err(
                    at("rank"),
                    format!("rank {r} exceeds d_in {}: a generated A needs r <= d_in", m.d_in),
                ));
            }
            let blocks = m.blocks();
            if r.checked_mul(m.d_in)
                .and_then(|n| n.checked_mul(blocks))
                .is_none_or(|n| n > MAX_GENERATED_A_ELEMENTS)
            {
                let experts = if m.experts.is_some() {
                    format!("{blocks} experts x ")
                } else {
                    String::new()
                };
                return Err(rep.err(
                    at("d_in"),
                    format!(
                        "{experts}rank {r} x d_in {} is more than the {MAX_GENERATED_A_ELEMENTS} elements a generated A may have",
                        m.d_in
                    ),
                ));
            }
            let last = m.stream.checked_add(blocks as u64 - 1).ok_or_else(|| {
                rep.err(
                    at("stream"),
                    format!(
                        "stream {} + {blocks} experts passes 2^64 - 1: every expert stream must fit in 64 bits",
                        m.stream
                    ),
                )
            })?;
            ranges.push((m.stream.into(), u128::from(last) + 1, name));
        }
    }
    check_stream_ranges(rep, &mut ranges)
}

/// Generated `A`s need distinct streams: a module uses `[stream, stream + experts)`.
fn check_stream_ranges(rep: &Reporter<'_>, ranges: &mut [(u128, u128, &str)]) -> Result<()> {
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((s0, e0, first), (s1, e1, second)) = (pair[0], pair[1]);
        if s1 < e0 {
            let shown = |s: u128, e: u128| {
                if e - s == 1 {
                    format!("stream {s}")
                } else {
                    format!("streams {s}..{e}")
                }
            };
            // Name the module later in name order, as a walk over the modules would.
            let (name, other) = if first < second {
                (second, first)
            } else {
                (first, second)
            };
            return Err(rep.err(
                format!("module {name:?}: stream"),
                format!(
                    "{} overlaps {} of module {other:?}; generated A's need distinct streams",
                    if name == second { shown(s1, e1) } else { shown(s0, e0) },
                    if name == second { shown(s0, e0) } else { shown(s1, e1) },
                ),
            ));
        }
    }
    Ok(())
}

/// `kind`, `kernel`, `experts` and `transposed`: each field only for its kind, in range.
fn check_kind_fields(rep: &Reporter<'_>, name: &str, m: &ModuleConfig) -> Result<()> {
    let at = |field: &str| format!("module {name:?}: {field}");
    let kind = m.kind.name();
    let only = |field: &str, allowed: &str| rep.err(at(field), format!("is only for kind {allowed}, not {kind:?}"));
    if m.kernel.is_some() && m.kind != ModuleKind::Conv {
        return Err(only("kernel", "\"conv\""));
    }
    if m.experts.is_some() && m.kind != ModuleKind::Parameter {
        return Err(only("experts", "\"parameter\""));
    }
    if m.transposed.is_some() && m.kind != ModuleKind::Parameter {
        return Err(only("transposed", "\"parameter\""));
    }
    if m.kind == ModuleKind::Conv {
        let kernel = m.kernel.as_ref().ok_or_else(|| {
            rep.err(
                at("kernel"),
                "missing: a conv module needs its kernel size (1 to 3 integers)",
            )
        })?;
        if kernel.is_empty() || kernel.len() > 3 || kernel.contains(&0) {
            return Err(rep.err(at("kernel"), format!("must be 1 to 3 integers >= 1, got {kernel:?}")));
        }
        let taps = kernel.iter().try_fold(1usize, |acc, &k| acc.checked_mul(k));
        if taps.is_none_or(|t| m.d_in % t != 0) {
            return Err(rep.err(
                at("kernel"),
                format!(
                    "{kernel:?} does not divide d_in {}: a conv's d_in is c_in x the product of its kernel",
                    m.d_in
                ),
            ));
        }
    }
    if m.experts == Some(0) {
        return Err(rep.err(at("experts"), "must be at least 1"));
    }
    Ok(())
}

/// What the config says a tensor is.
#[derive(Clone, Copy, PartialEq)]
enum Role<'a> {
    FactorOf(&'a str),
    Full,
}

fn validate_tensors(rep: &Reporter<'_>, config: &AdapterConfig, tensors: &BTreeMap<String, TensorInfo>) -> Result<()> {
    let mut described: HashMap<String, Role<'_>> = HashMap::new();
    for (name, m) in &config.modules {
        let r = config.module_rank(m);
        let b = lora_b_name(name);
        expect_factor(rep, name, "lora_B", tensors.get(&b), &m.b_shape(r))?;
        described.insert(b, Role::FactorOf(name));
        let a = lora_a_name(name);
        match (m.a_stored, tensors.get(&a)) {
            (true, info) => {
                expect_factor(rep, name, "lora_A", info, &m.a_shape(r))?;
            }
            (false, Some(_)) => {
                return Err(rep.err(
                    format!("module {name:?}: a_stored"),
                    format!("is false but the file holds tensor {a:?}; set a_stored = true or drop the tensor"),
                ))
            }
            (false, None) => {}
        }
        described.insert(a, Role::FactorOf(name));
    }
    for full in &config.full_tensors {
        match described.get(full) {
            Some(Role::Full) => return Err(rep.err("config.full_tensors", format!("lists {full:?} twice"))),
            Some(Role::FactorOf(module)) => {
                return Err(rep.err(
                    "config.full_tensors",
                    format!("{full:?} is also a factor of module {module:?}"),
                ))
            }
            None => {}
        }
        let info = tensors.get(full).ok_or_else(|| {
            rep.err(
                "config.full_tensors",
                format!("lists {full:?}, which the file does not hold"),
            )
        })?;
        require_float(rep, &format!("tensor {full:?}"), info)?;
        described.insert(full.clone(), Role::Full);
    }
    if let Some(stray) = tensors.keys().find(|t| !described.contains_key(*t)) {
        return Err(rep.err(
            format!("tensor {stray:?}"),
            "is not described by the config (neither a module factor nor in full_tensors)",
        ));
    }
    Ok(())
}

fn expect_factor(
    rep: &Reporter<'_>,
    module: &str,
    factor: &str,
    info: Option<&TensorInfo>,
    shape: &[usize],
) -> Result<()> {
    let at = format!("module {module:?}: {factor}");
    let info = info.ok_or_else(|| rep.err(&at, format!("tensor {module}.{factor} is missing")))?;
    require_float(rep, &at, info)?;
    if info.shape != shape {
        return Err(rep.err(
            &at,
            format!(
                "shape {:?} does not match the config: expected {:?} (from d_in, d_out, rank and experts)",
                info.shape, shape
            ),
        ));
    }
    Ok(())
}

/// Factors and full tensors are floating point (F16, BF16, F32, F64).
fn require_float(rep: &Reporter<'_>, location: &str, info: &TensorInfo) -> Result<()> {
    if FACTOR_DTYPES.contains(&info.dtype) {
        return Ok(());
    }
    Err(rep.err(
        location,
        format!(
            "dtype {} is not a floating-point type (F16, BF16, F32, F64)",
            info.dtype
        ),
    ))
}

/// The message of an `InvalidArgument`, without the argument prefix.
fn inner_message(e: Error) -> String {
    match e {
        Error::InvalidArgument { message, .. } => message,
        other => other.to_string(),
    }
}
