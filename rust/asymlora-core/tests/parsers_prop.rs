//! Property and mutation tests of every reader of outside input: adapter files (the
//! safetensors header and the asymlora config in it), PEFT adapter directories
//! (`adapter_config.json` and its rank/alpha patterns), the shard index of a model
//! directory, and the CLI's `ADAPTER:WEIGHT` and `OLD=NEW` arguments.
//!
//! Each starts from a valid input and feeds random bytes, truncations, bit flips and
//! field mutations to the reader: it must never panic or abort, and every refusal is
//! a one-line error naming the file (or argument) and, for config fields, the field.
//! Case counts are small (`CASES`) so the whole file runs in a few seconds.
//!
//! The same readers have libFuzzer targets in `../fuzz` (nightly and cargo-fuzz:
//! `cargo +nightly fuzz run adapter_file`), outside the workspace and not run in CI;
//! these bounded proptest strategies run on every `cargo test`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use asymlora_core::adapter::{
    render_inspect, write_adapter, AdapterConfig, AdapterFile, FactorA, ModuleConfig, ModuleKind, OwnedTensor, Scaling,
    META_CONFIG,
};
use asymlora_core::io::{write_safetensors, SafetensorsFile};
use asymlora_core::merge::{self, AdapterInput, MergeOptions, Silent};
use asymlora_core::peft::{PatternRule, PeftAdapter};
use asymlora_core::{Dtype, Error};
use proptest::prelude::*;
use safetensors::Dtype as St;
use serde_json::{json, Value};

const CASES: u32 = 64;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The error is one line and names `what` (a file or an argument).
fn assert_one_line_naming(err: &Error, what: &str) {
    let text = err.to_string();
    assert!(!text.contains('\n'), "not one line: {text:?}");
    assert!(text.contains(what), "{text:?} does not name {what:?}");
}

fn f32_tensor(name: &str, shape: &[usize], seed: u64) -> (String, OwnedTensor) {
    let n = shape.iter().product();
    common::tensor(name, St::F32, shape, &common::Rng(seed).vec(n, 1.0))
}

/// A valid adapter: one module with a regenerated `A`, one with a stored `A`
/// (its own rank and alpha), and one full tensor.
fn valid_adapter() -> (AdapterConfig, BTreeMap<String, OwnedTensor>) {
    let module = |stream, a_stored, rank| ModuleConfig {
        d_in: 6,
        d_out: 5,
        stream,
        a_stored,
        rank,
        alpha: rank.map(|_| 3.0),
        ..ModuleConfig::linear(6, 5, 0, false)
    };
    let config = AdapterConfig {
        rank: 2,
        alpha: 4.0,
        scaling: Scaling::AlphaOverR,
        seed: 7,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules: BTreeMap::from([
            ("m.q".to_string(), module(0, false, None)),
            ("m.v".to_string(), module(1, true, Some(3))),
            // the kind fields, so that mutations reach them too
            (
                "m.c".to_string(),
                ModuleConfig {
                    kind: ModuleKind::Conv,
                    kernel: Some(vec![3]),
                    ..ModuleConfig::linear(6, 4, 2, false)
                },
            ),
            (
                "m.e.w".to_string(),
                ModuleConfig {
                    kind: ModuleKind::Parameter,
                    experts: Some(2),
                    transposed: Some(true),
                    ..ModuleConfig::linear(6, 3, 3, false)
                },
            ),
        ]),
        full_tensors: vec!["head.weight".into()],
        base_model: Some(json!({"fan_in_fan_out": false})),
    };
    let tensors = BTreeMap::from([
        f32_tensor("m.q.lora_B", &[5, 2], 1),
        f32_tensor("m.v.lora_A", &[3, 6], 2),
        f32_tensor("m.v.lora_B", &[5, 3], 3),
        f32_tensor("m.c.lora_B", &[4, 2], 5),
        f32_tensor("m.e.w.lora_B", &[2, 3, 2], 6),
        f32_tensor("head.weight", &[2, 3], 4),
    ]);
    (config, tensors)
}

fn valid_adapter_bytes(dir: &Path) -> Vec<u8> {
    let (config, tensors) = valid_adapter();
    let path = dir.join("valid.safetensors");
    write_adapter(&path, &config, &tensors).unwrap();
    std::fs::read(&path).unwrap()
}

/// Opens `path` as an adapter and, when it opens, uses every part of it (factors,
/// the generated `A`s, sizes, the inspect text): nothing may panic.
fn open_and_use(path: &Path) -> Result<(), Error> {
    let file = AdapterFile::open(path)?;
    let _ = render_inspect(&file);
    let _ = file.classic_lora_size();
    let config = file.config().clone();
    for (name, m) in &config.modules {
        file.lora_b(name)?;
        if m.a_stored || config.module_rank(m) * m.d_in * m.blocks() <= 1 << 16 {
            if let FactorA::Stored { info, bytes } = file.lora_a(name)? {
                assert_eq!(bytes.len(), info.shape.iter().product::<usize>() * 4);
            }
        }
    }
    Ok(())
}

/// Random bytes and mutations of a valid file: never a panic, always a one-line error
/// naming the file (a bit flip in tensor data may leave a valid file).
fn check_adapter_bytes(dir: &Path, bytes: &[u8]) {
    let path = dir.join("mutated.safetensors");
    std::fs::write(&path, bytes).unwrap();
    if let Err(e) = open_and_use(&path) {
        assert_one_line_naming(&e, &path.display().to_string());
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn adapter_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), header in 0u64..400) {
        let dir = tempfile::tempdir().unwrap();
        check_adapter_bytes(dir.path(), &bytes);
        // The same bytes behind a plausible header length (the random length above
        // almost never is one), so the JSON parser sees them too.
        let mut framed = header.to_le_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        check_adapter_bytes(dir.path(), &framed);
    }

    #[test]
    fn adapter_truncated(cut in any::<prop::sample::Index>()) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = valid_adapter_bytes(dir.path());
        let path = dir.path().join("cut.safetensors");
        std::fs::write(&path, &bytes[..cut.index(bytes.len())]).unwrap();
        let err = open_and_use(&path).expect_err("a truncated file is refused");
        assert_one_line_naming(&err, &path.display().to_string());
    }

    #[test]
    fn adapter_bit_flips(flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_adapter_bytes(dir.path());
        let n = bytes.len();
        for (at, bit) in &flips {
            // Flips land in the header 3 times out of 4: that is where the parsing is.
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let i = at.index(if bit % 4 == 0 { n } else { header.min(n) });
            bytes[i] ^= 1 << bit;
        }
        check_adapter_bytes(dir.path(), &bytes);
    }
}

/// JSON values of every type, including the wrong-type look-alikes (`"false"`, `"8"`)
/// and numbers beyond every field's range.
fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        Just(json!("false")),
        Just(json!("8")),
        Just(json!("haar-v9")),
        Just(json!("alpha/sqrt(r)")),
        Just(json!("BF16")),
        (-3i64..10).prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1u64 << 40)),
        Just(json!(1.5)),
        Just(json!(1e300)),
        Just(json!(-0.0)),
        Just(json!([])),
        Just(json!(["m.q.lora_B"])),
        Just(json!({})),
        Just(json!({"d_in": 6})),
    ]
}

/// Every path into `v` (object members and array items), outermost first.
fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect(),
        _ => vec![],
    };
    for (key, child) in children {
        at.push(key);
        out.push(at.clone());
        paths(child, at, out);
        at.pop();
    }
}

/// Sets (`Some`) or removes (`None`) the value at `path`.
fn mutate(root: &mut Value, path: &[String], new: Option<Value>) {
    let (last, parents) = path.split_last().expect("a non-empty path");
    let mut v = root;
    for key in parents {
        v = match v {
            Value::Object(m) => m.get_mut(key).unwrap(),
            Value::Array(a) => &mut a[key.parse::<usize>().unwrap()],
            _ => unreachable!("paths() only descends into objects and arrays"),
        };
    }
    match (v, new) {
        (Value::Object(m), Some(x)) => {
            m.insert(last.clone(), x);
        }
        (Value::Object(m), None) => {
            m.remove(last);
        }
        (Value::Array(a), Some(x)) => a[last.parse::<usize>().unwrap()] = x,
        (Value::Array(a), None) => {
            a.remove(last.parse::<usize>().unwrap());
        }
        _ => unreachable!("paths() only descends into objects and arrays"),
    }
}

/// The valid adapter's tensors with `json` as its config.
fn write_with_config(path: &Path, json: &str) {
    let (_, tensors) = valid_adapter();
    let meta = BTreeMap::from([
        ("format".to_string(), "asymlora".to_string()),
        ("format_version".to_string(), "1".to_string()),
        (META_CONFIG.to_string(), json.to_string()),
    ]);
    write_safetensors(path, &tensors, &meta).unwrap();
}

fn valid_config_json() -> Value {
    serde_json::from_str(&valid_adapter().0.to_json()).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// A field of the config replaced (or removed): refused naming the file and the
    /// config, or accepted and usable; never a panic, never a huge allocation (a
    /// `d_in` of 2^40 for a generated `A` is refused before `A` is generated).
    #[test]
    fn config_field_mutations(pick in any::<prop::sample::Index>(), new in proptest::option::weighted(0.9, any_json())) {
        let mut v = valid_config_json();
        let mut all = vec![];
        paths(&v, &mut vec![], &mut all);
        let path = &all[pick.index(all.len())];
        mutate(&mut v, path, new);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.safetensors");
        write_with_config(&file, &v.to_string());
        if let Err(e) = open_and_use(&file) {
            assert_one_line_naming(&e, &file.display().to_string());
        }
    }

    /// The config text itself cut or with bytes replaced: a one-line error naming the
    /// metadata key (serde_json's message already is one line, with line and column).
    #[test]
    fn config_text_mutations(cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let text = valid_adapter().0.to_json().into_bytes();
        let mut edited = text[..cut.index(text.len())].to_vec();
        if !edited.is_empty() {
            let i = at.index(edited.len());
            edited[i] = byte;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.safetensors");
        write_with_config(&file, &String::from_utf8_lossy(&edited));
        if let Err(e) = open_and_use(&file) {
            assert_one_line_naming(&e, &file.display().to_string());
        }
    }
}

/// Refusal of `field` set to `value` in the asymlora config: one line, naming the file
/// and the field.
fn asymlora_config_error(path: &[&str], value: Value) -> String {
    let mut v = valid_config_json();
    let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    mutate(&mut v, &path, Some(value));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.safetensors");
    write_with_config(&file, &v.to_string());
    let err = AdapterFile::open(&file).err().expect("a wrong-typed field is refused");
    assert_one_line_naming(&err, &file.display().to_string());
    assert!(matches!(err, Error::AdapterFormat { .. }), "{err:?}");
    err.to_string()
}

#[test]
fn asymlora_config_wrong_types() {
    let table: &[(&[&str], Value, &str)] = &[
        (
            &["rank"],
            json!("2"),
            "field rank: invalid type: string \"2\", expected usize",
        ),
        (
            &["rank"],
            json!(-1),
            "field rank: invalid value: integer `-1`, expected usize",
        ),
        (
            &["rank"],
            json!(2.0),
            "field rank: invalid type: floating point `2.0`, expected usize",
        ),
        (
            &["alpha"],
            json!("4"),
            "field alpha: invalid type: string \"4\", expected f64",
        ),
        (
            &["seed"],
            json!(true),
            "field seed: invalid type: boolean `true`, expected u64",
        ),
        (
            &["generator"],
            json!(1),
            "field generator: invalid type: integer `1`, expected a string",
        ),
        (&["a_dtype"], json!(32), "field a_dtype"),
        (
            &["a_gain"],
            json!("1"),
            "field a_gain: invalid type: string \"1\", expected f64",
        ),
        (&["scaling"], json!(false), "field scaling"),
        (
            &["modules"],
            json!([]),
            "field modules: invalid type: sequence, expected a map",
        ),
        (
            &["full_tensors"],
            json!("head.weight"),
            "field full_tensors: invalid type: string",
        ),
        (
            &["base_model"],
            json!("llama"),
            "config.base_model: must be a JSON object",
        ),
        (
            &["modules", "m.q", "a_stored"],
            json!("false"),
            "field modules.m.q.a_stored: invalid type: string \"false\", expected a boolean",
        ),
        (
            &["modules", "m.q", "a_stored"],
            json!(0),
            "field modules.m.q.a_stored: invalid type: integer `0`, expected a boolean",
        ),
        (
            &["modules", "m.q", "d_in"],
            json!("6"),
            "field modules.m.q.d_in: invalid type: string \"6\"",
        ),
        (
            &["modules", "m.q", "d_out"],
            json!(5.5),
            "field modules.m.q.d_out: invalid type: floating point",
        ),
        (
            &["modules", "m.q", "stream"],
            json!(null),
            "field modules.m.q.stream: invalid type: null",
        ),
        (
            &["modules", "m.v", "rank"],
            json!("3"),
            "field modules.m.v.rank: invalid type: string \"3\"",
        ),
        (
            &["modules", "m.v", "alpha"],
            json!([3]),
            "field modules.m.v.alpha: invalid type: sequence",
        ),
        (
            &["modules", "m.q", "extra"],
            json!(1),
            "field modules.m.q.extra: unknown field `extra`",
        ),
        // Numbers of the right type that no tensor bounds are checked before use.
        (
            &["modules", "m.q", "d_in"],
            json!(1u64 << 40),
            "module \"m.q\": d_in: rank 2 x d_in 1099511627776 is more",
        ),
        (
            &["modules", "m.q", "d_in"],
            json!(u64::MAX),
            "module \"m.q\": d_in: rank 2 x d_in 18446744073709551615",
        ),
    ];
    for (path, value, expected) in table {
        let message = asymlora_config_error(path, value.clone());
        assert!(
            message.contains(expected),
            "{path:?} = {value}: {message:?} lacks {expected:?}"
        );
        assert!(
            ["asymlora_config", "config.", "module \"m.q\""]
                .iter()
                .any(|f| message.contains(f)),
            "{message}"
        );
    }
}

/// A valid PEFT LoRA directory with one module (r 2, d_in 6, d_out 4) and `config`.
fn write_peft(dir: &Path, config: &Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let tensors = BTreeMap::from([
        f32_tensor("base_model.model.layer.q.lora_A.weight", &[2, 6], 5),
        f32_tensor("base_model.model.layer.q.lora_B.weight", &[4, 2], 6),
        f32_tensor("base_model.model.head.modules_to_save.default.weight", &[3, 2], 7),
    ]);
    write_safetensors(dir.join("adapter_model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    dir.join("adapter_config.json")
}

fn valid_peft_config() -> Value {
    json!({
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "use_rslora": false,
        "fan_in_fan_out": false,
        "use_dora": false,
        "bias": "none",
        "modules_to_save": ["head"],
        "rank_pattern": {"q": 2},
        "alpha_pattern": {"layer.q": 8},
        "target_modules": ["q"],
        "init_lora_weights": true
    })
}

#[test]
fn peft_valid_directory_opens() {
    let dir = tempfile::tempdir().unwrap();
    write_peft(dir.path(), &valid_peft_config());
    let peft = PeftAdapter::open(dir.path()).unwrap();
    assert_eq!(peft.modules["layer.q"].alpha, 8.0);
}

#[test]
fn peft_config_wrong_types() {
    let table: &[(&str, Value, &str)] = &[
        ("r", json!("2"), "r: must be a positive integer, got \"2\""),
        ("r", json!(2.5), "r: must be a positive integer, got 2.5"),
        ("r", json!(0), "r: must be a positive integer, got 0"),
        (
            "lora_alpha",
            json!("4"),
            "lora_alpha: must be a finite number, got \"4\"",
        ),
        (
            "use_rslora",
            json!("false"),
            "use_rslora: must be true or false, got \"false\"",
        ),
        (
            "fan_in_fan_out",
            json!("false"),
            "fan_in_fan_out: must be true or false, got \"false\"",
        ),
        (
            "fan_in_fan_out",
            json!(0),
            "fan_in_fan_out: must be true or false, got 0",
        ),
        (
            "use_dora",
            json!("false"),
            "use_dora: must be true or false, got \"false\"",
        ),
        (
            "lora_bias",
            json!("false"),
            "lora_bias: must be true or false, got \"false\"",
        ),
        ("use_qalora", json!(0), "use_qalora: must be true or false, got 0"),
        ("peft_type", json!(1), "peft_type: is 1"),
        ("bias", json!(false), "bias: false trains biases"),
        (
            "modules_to_save",
            json!("head"),
            "modules_to_save: must be a list of module names, got \"head\"",
        ),
        (
            "modules_to_save",
            json!([1]),
            "modules_to_save: must be a list of module names",
        ),
        (
            "rank_pattern",
            json!(["q"]),
            "rank_pattern/alpha_pattern: must be objects",
        ),
        (
            "rank_pattern",
            json!({"q": "2"}),
            "rank_pattern[\"q\"]: must be an integer, got \"2\"",
        ),
        (
            "alpha_pattern",
            json!({"q": "8"}),
            "alpha_pattern[\"q\"]: must be a finite number, got \"8\"",
        ),
        (
            "alpha_pattern",
            json!({"q(": 8}),
            "alpha_pattern[\"q(\"]: not a regex asymlora can evaluate: unclosed group",
        ),
    ];
    for (field, value, expected) in table {
        let mut config = valid_peft_config();
        config[field] = value.clone();
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_peft(dir.path(), &config);
        let err = PeftAdapter::open(dir.path())
            .err()
            .expect("a wrong-typed field is refused");
        assert_one_line_naming(&err, &config_path.display().to_string());
        assert!(matches!(err, Error::AdapterFormat { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(expected),
            "{field} = {value}: {message:?} lacks {expected:?}"
        );
    }
}

/// Pattern keys: any string, compiled as PEFT's rule does; a bad one is a one-line
/// message (the regex crate's own is several lines).
fn any_key() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z_.()\\[\\]*+?{}|^$\\\\0-9]{0,12}", any::<String>(),]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pattern_keys(keys in proptest::collection::vec(any_key(), 0..4), module in "[a-z_.0-9]{0,20}") {
        match PatternRule::new(keys.clone()) {
            Ok(rule) => {
                if let Some(i) = rule.first_match(&module) {
                    assert_eq!(rule.key(i), keys[i]);
                }
            }
            Err(bad) => {
                assert!(keys.contains(&bad.key));
                assert!(!bad.message.contains('\n'), "not one line: {:?}", bad.message);
            }
        }
    }

    #[test]
    fn peft_config_mutations(
        pick in any::<prop::sample::Index>(),
        new in proptest::option::weighted(0.9, any_json()),
        text_cut in proptest::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let mut v = valid_peft_config();
        let mut all = vec![];
        paths(&v, &mut vec![], &mut all);
        mutate(&mut v, &all[pick.index(all.len())], new);
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_peft(dir.path(), &v);
        if let Some(cut) = text_cut {
            let text = v.to_string();
            std::fs::write(&config_path, &text[..cut.index(text.len())]).unwrap();
        }
        if let Err(e) = PeftAdapter::open(dir.path()) {
            // The config, or the weights file when the config is fine but its rules
            // no longer fit the tensors.
            let text = e.to_string();
            assert!(!text.contains('\n'), "not one line: {text:?}");
            assert!(text.contains(&dir.path().display().to_string()), "{text}");
        }
    }

    /// PEFT's weights file mutated (a bit flip or a truncation).
    #[test]
    fn peft_weights_mutations(at in any::<prop::sample::Index>(), bit in 0u8..8, truncate in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        write_peft(dir.path(), &valid_peft_config());
        let weights = dir.path().join("adapter_model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let i = at.index(bytes.len());
        if truncate {
            bytes.truncate(i);
        } else {
            bytes[i] ^= 1 << bit;
        }
        std::fs::write(&weights, &bytes).unwrap();
        if let Err(e) = PeftAdapter::open(dir.path()) {
            assert_one_line_naming(&e, &weights.display().to_string());
        }
    }
}

const SHARD: &str = "model-00001-of-00001.safetensors";

/// A base model directory (one shard and its index) and an adapter that fits it.
fn write_sharded_base(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let tensors = BTreeMap::from([
        f32_tensor("m.q.weight", &[5, 6], 8),
        f32_tensor("m.v.weight", &[5, 6], 9),
        f32_tensor("head.weight", &[2, 3], 10),
        // the conv m.c (4 out, 2 in, kernel 3) and the transposed experts m.e.w (E, d_in, d_out)
        f32_tensor("m.c.weight", &[4, 2, 3], 11),
        f32_tensor("m.e.w", &[2, 6, 3], 12),
    ]);
    write_safetensors(base.join(SHARD), &tensors, &BTreeMap::new()).unwrap();
    let index = json!({
        "metadata": {"total_size": 504},
        "weight_map": {
            "m.q.weight": SHARD, "m.v.weight": SHARD, "head.weight": SHARD,
            "m.c.weight": SHARD, "m.e.w": SHARD
        }
    });
    std::fs::write(base.join(merge::INDEX_NAME), index.to_string()).unwrap();
    let (config, tensors) = valid_adapter();
    let adapter = dir.join("adapter.safetensors");
    write_adapter(&adapter, &config, &tensors).unwrap();
    (base, adapter)
}

fn try_merge(base: &Path, adapter: &Path, out: &Path) -> Result<(), Error> {
    let opts = MergeOptions {
        dtype: None,
        threads: Some(1),
        force: false,
        prefix_map: vec![],
        allow_nonfinite: false,
        subtract: false,
        fsync: false,
    };
    merge::merge(base, &[AdapterInput::new(adapter, 1.0)], out, &opts, &mut Silent).map(|_| ())
}

#[test]
fn sharded_base_merges() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = write_sharded_base(dir.path());
    try_merge(&base, &adapter, &dir.path().join("out")).unwrap();
    SafetensorsFile::open(dir.path().join("out").join(SHARD)).unwrap();
}

proptest! {
    #![proptest_config(config())]

    /// The shard index mutated (a field, its text cut, or random bytes): refused with
    /// a one-line error naming the index (or merged, when the mutation kept it valid).
    #[test]
    fn shard_index_mutations(
        pick in any::<prop::sample::Index>(),
        new in proptest::option::weighted(0.9, prop_oneof![any_json(), Just(json!("../x.safetensors")), Just(json!("missing.safetensors"))]),
        cut in proptest::option::weighted(0.2, any::<prop::sample::Index>()),
        noise in proptest::option::weighted(0.1, proptest::collection::vec(any::<u8>(), 0..64)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = write_sharded_base(dir.path());
        let index_path = base.join(merge::INDEX_NAME);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        let mut all = vec![];
        paths(&v, &mut vec![], &mut all);
        mutate(&mut v, &all[pick.index(all.len())], new);
        let mut text = v.to_string().into_bytes();
        if let Some(cut) = cut {
            text.truncate(cut.index(text.len()));
        }
        if let Some(noise) = noise {
            text = noise;
        }
        std::fs::write(&index_path, &text).unwrap();
        if let Err(e) = try_merge(&base, &adapter, &dir.path().join("out")) {
            let message = e.to_string();
            assert!(!message.contains('\n'), "not one line: {message:?}");
            assert!(message.contains(&base.display().to_string()), "{message}");
        }
    }

    /// `ADAPTER:WEIGHT`: any text parses or is refused naming `adapters`, on one line.
    #[test]
    fn adapter_arguments(arg in prop_oneof!["[a-z/.]{0,8}:[-+0-9.eEinfa]{0,8}", any::<String>()]) {
        match AdapterInput::parse(&arg) {
            Ok(input) => assert!(input.weight.is_finite()),
            Err(e) => assert_one_line_naming(&e, "`adapters`"),
        }
    }

    /// `OLD=NEW` prefix maps.
    #[test]
    fn prefix_map_arguments(arg in prop_oneof!["[a-z.=]{0,10}", any::<String>()]) {
        match merge::parse_prefix_map(&arg) {
            Ok((old, new)) => assert!(old != new && arg == format!("{old}={new}")),
            Err(e) => assert_one_line_naming(&e, "`prefix_map`"),
        }
    }
}

#[test]
fn adapter_argument_with_existing_path_and_bad_weight_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    std::fs::write(&path, b"x").unwrap();
    let arg = format!("{}:half", path.display());
    let err = AdapterInput::parse(&arg).unwrap_err();
    assert_one_line_naming(&err, "`adapters`");
    assert!(err.to_string().contains("\"half\" is not a number"), "{err}");
    let err = AdapterInput::parse(&format!("{}:inf", path.display())).unwrap_err();
    assert!(err.to_string().contains("finite"), "{err}");
}
