//! Adapter format v1 on real files: round trips, and every validation rule
//! rejecting a bad file with an error that names the module and field.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use asymlora_core::adapter::{
    write_adapter, AdapterConfig, AdapterFile, FactorA, ModuleConfig, ModuleKind, OwnedTensor, Scaling, META_CONFIG,
};
use asymlora_core::{random_orthogonal, Dtype, Error, Matrix};
use safetensors::Dtype as St;

fn f32_tensor(name: &str, shape: [usize; 2], fill: f32) -> OwnedTensor {
    let n = shape[0] * shape[1];
    let data = (0..n).flat_map(|i| (fill + i as f32).to_le_bytes()).collect();
    OwnedTensor::new(name, St::F32, shape.to_vec(), data).unwrap()
}

fn module(d_in: usize, d_out: usize, stream: u64) -> ModuleConfig {
    ModuleConfig::linear(d_in, d_out, stream, false)
}

/// Two seeded modules, one with a stored A, one full tensor.
fn sample() -> (AdapterConfig, BTreeMap<String, OwnedTensor>) {
    let mut modules = BTreeMap::new();
    modules.insert("layers.0.q".to_string(), module(8, 6, 0));
    modules.insert("layers.0.up".to_string(), module(8, 12, 1));
    modules.insert(
        "layers.0.down".to_string(),
        ModuleConfig {
            a_stored: true,
            ..module(12, 8, 2)
        },
    );
    let config = AdapterConfig {
        rank: 4,
        alpha: 8.0,
        scaling: Scaling::AlphaOverR,
        seed: 42,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors: vec!["head.weight".into()],
        base_model: None,
    };
    let mut t = BTreeMap::new();
    for (name, shape) in [
        ("layers.0.q.lora_B", [6, 4]),
        ("layers.0.up.lora_B", [12, 4]),
        ("layers.0.down.lora_B", [8, 4]),
        ("layers.0.down.lora_A", [4, 12]),
        ("head.weight", [2, 8]),
    ] {
        t.insert(name.to_string(), f32_tensor(name, shape, 0.5));
    }
    (config, t)
}

fn expect_format_error(result: Result<(), Error>, needles: &[&str]) {
    match result {
        Err(Error::AdapterFormat { .. }) => {
            let message = result.unwrap_err().to_string();
            for needle in needles {
                assert!(message.contains(needle), "{message:?} should mention {needle:?}");
            }
        }
        other => panic!("expected a format error mentioning {needles:?}, got {other:?}"),
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn round_trip_keeps_config_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let (config, tensors) = sample();
    write_adapter(&path, &config, &tensors).unwrap();
    let file = AdapterFile::open(&path).unwrap();
    assert_eq!(file.config(), &config);
    for (name, t) in &tensors {
        let (info, bytes) = file.tensor(name).unwrap();
        assert_eq!(info, &t.info);
        assert_eq!(bytes, &t.data[..]);
    }
    match file.lora_a("layers.0.q").unwrap() {
        FactorA::Generated(m) => {
            let expected = random_orthogonal(&config.a_spec(&config.modules["layers.0.q"]), Dtype::F32).unwrap();
            assert_eq!(m, expected);
        }
        FactorA::Stored { .. } => panic!("q's A is seeded"),
    }
    match file.lora_a("layers.0.down").unwrap() {
        FactorA::Stored { bytes, .. } => assert_eq!(bytes, &tensors["layers.0.down.lora_A"].data[..]),
        FactorA::Generated(_) => panic!("down's A is stored"),
    }
    assert_eq!(
        files_in(dir.path()),
        vec!["a.safetensors"],
        "no temporary file left behind"
    );
}

#[test]
fn streams_not_names_decide_a() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, mut tensors) = sample();
    let path = dir.path().join("a.safetensors");
    write_adapter(&path, &config, &tensors).unwrap();
    let before = match AdapterFile::open(&path).unwrap().lora_a("layers.0.q").unwrap() {
        FactorA::Generated(m) => m,
        FactorA::Stored { .. } => unreachable!(),
    };
    let m = config.modules.remove("layers.0.q").unwrap();
    config.modules.insert("model.renamed.q_proj".into(), m);
    let b = tensors.remove("layers.0.q.lora_B").unwrap();
    tensors.insert("model.renamed.q_proj.lora_B".into(), b);
    write_adapter(&path, &config, &tensors).unwrap();
    let FactorA::Generated(after) = AdapterFile::open(&path)
        .unwrap()
        .lora_a("model.renamed.q_proj")
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(before, after);
    assert!(matches!(before, Matrix::F32(_)));
}

#[test]
fn module_overrides_of_rank_and_alpha() {
    let (mut config, mut tensors) = sample();
    config.scaling = Scaling::AlphaOverSqrtR;
    let q = config.modules.get_mut("layers.0.q").unwrap();
    q.rank = Some(2);
    q.alpha = Some(3.0);
    tensors.insert("layers.0.q.lora_B".into(), f32_tensor("b", [6, 2], 0.0));
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path().join("a.safetensors"), &config, &tensors).unwrap();
    let q = &config.modules["layers.0.q"];
    assert_eq!(config.module_scale(q), 3.0 / 2f64.sqrt());
    assert_eq!(config.module_scale(&config.modules["layers.0.up"]), 8.0 / 2.0);
}

/// Each broken variant is refused before anything is written.
#[test]
fn invalid_adapters_are_refused_with_named_fields() {
    type Breaker = fn(&mut AdapterConfig, &mut BTreeMap<String, OwnedTensor>);
    let cases: Vec<(Breaker, Vec<&str>)> = vec![
        (
            |_, t| {
                t.insert("layers.0.q.lora_B".into(), f32_tensor("b", [6, 3], 0.0));
            },
            vec!["layers.0.q", "lora_B", "[6, 3]", "[6, 4]"],
        ),
        (
            |_, t| {
                t.remove("layers.0.up.lora_B");
            },
            vec!["layers.0.up", "missing"],
        ),
        (
            |_, t| {
                t.insert("layers.0.q.lora_A".into(), f32_tensor("a", [4, 8], 0.0));
            },
            vec!["layers.0.q", "a_stored"],
        ),
        (
            |_, t| {
                t.remove("layers.0.down.lora_A");
            },
            vec!["layers.0.down", "lora_A", "missing"],
        ),
        (
            |_, t| {
                t.insert("layers.0.down.lora_A".into(), f32_tensor("a", [4, 11], 0.0));
            },
            vec!["layers.0.down", "lora_A", "[4, 12]"],
        ),
        (
            |c, _| c.generator = "haar-v9".into(),
            vec!["generator", "haar-v9", "haar-v1"],
        ),
        (|c, _| c.rank = 0, vec!["config.rank"]),
        (|c, _| c.alpha = f64::NAN, vec!["config.alpha"]),
        (
            |c, _| c.modules.get_mut("layers.0.up").unwrap().stream = 0,
            vec!["stream", "distinct"],
        ),
        (
            |c, t| {
                c.modules.get_mut("layers.0.q").unwrap().rank = Some(9);
                t.insert("layers.0.q.lora_B".into(), f32_tensor("b", [6, 9], 0.0));
            },
            vec!["layers.0.q", "rank 9 exceeds d_in 8"],
        ),
        (
            |_, t| {
                t.insert("stray".into(), f32_tensor("s", [1, 1], 0.0));
            },
            vec!["\"stray\"", "not described"],
        ),
        (
            |c, _| c.full_tensors.push("missing.weight".into()),
            vec!["full_tensors", "missing.weight"],
        ),
        (
            |c, _| c.full_tensors.push("layers.0.q.lora_B".into()),
            vec!["full_tensors", "layers.0.q"],
        ),
        (|c, _| c.modules.clear(), vec!["config.modules", "empty"]),
        (
            |c, _| c.full_tensors.push("head.weight".into()),
            vec!["full_tensors", "twice"],
        ),
        (
            |_, t| {
                t.insert(
                    "head.weight".into(),
                    OwnedTensor::new("h", St::I64, vec![2], vec![0; 16]).unwrap(),
                );
            },
            vec!["head.weight", "floating-point"],
        ),
        (|c, _| c.a_gain = 0.0, vec!["config.a_gain", "non-zero"]),
        (
            |c, _| c.base_model = Some(serde_json::json!("llama")),
            vec!["config.base_model", "object"],
        ),
        (
            |c, _| c.modules.get_mut("layers.0.q").unwrap().d_in = 0,
            vec!["layers.0.q", "d_in"],
        ),
        (
            |_, t| {
                let data = vec![0u8; 6 * 4 * 4];
                t.insert(
                    "layers.0.q.lora_B".into(),
                    OwnedTensor::new("b", St::I32, vec![6, 4], data).unwrap(),
                );
            },
            vec!["layers.0.q", "floating-point"],
        ),
    ];
    for (i, (breaker, needles)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let (mut config, mut tensors) = sample();
        breaker(&mut config, &mut tensors);
        let result = write_adapter(&path, &config, &tensors);
        assert!(result.is_err(), "case {i} was accepted");
        expect_format_error(result, &needles);
        assert!(files_in(dir.path()).is_empty(), "case {i} left a file behind");
    }
}

type Metadata = Option<HashMap<String, String>>;

/// Writes a raw safetensors file (bypassing our writer's validation).
fn write_raw(path: &Path, metadata: Metadata, tensors: &BTreeMap<String, OwnedTensor>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(t.info.dtype, t.info.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

fn meta(format: &str, version: &str, config: &str) -> Metadata {
    Some(
        [("format", format), ("format_version", version), (META_CONFIG, config)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn reading_refuses_foreign_and_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let (config, tensors) = sample();
    let json = config.to_json();
    let cases: Vec<(Metadata, Vec<&str>)> = vec![
        (None, vec!["__metadata__", "not an asymlora adapter"]),
        (meta("peft", "1", &json), vec!["format", "peft"]),
        (meta("asymlora", "2", &json), vec!["format_version", "\"2\"", "upgrade"]),
        (
            meta("asymlora", "1", "{not json"),
            vec!["asymlora_config", "invalid config"],
        ),
        (
            meta("asymlora", "1", &json.replace("\"d_out\":6", "\"d_out\":7")),
            vec!["layers.0.q", "[7, 4]"],
        ),
        (
            meta(
                "asymlora",
                "1",
                &json.replace("\"a_dtype\":\"float32\"", "\"a_dtype\":\"float8\""),
            ),
            vec!["float8"],
        ),
        (
            meta(
                "asymlora",
                "1",
                &json.replace("\"a_dtype\":\"float32\"", "\"a_dtype\":\"f32\""),
            ),
            vec!["\"f32\""],
        ),
        (
            meta(
                "asymlora",
                "1",
                &json.replace("\"rank\":4,", "\"rank\":4,\"dropout\":0.1,"),
            ),
            vec!["unknown field", "dropout"],
        ),
        (
            meta(
                "asymlora",
                "1",
                &json.replace("\"stream\":0,", "\"stream\":0,\"bias\":true,"),
            ),
            vec!["unknown field", "bias"],
        ),
    ];
    for (i, (metadata, needles)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case{i}.safetensors"));
        write_raw(&path, metadata, &tensors);
        let result = AdapterFile::open(&path).map(|_| ());
        expect_format_error(result, &needles);
    }
}

#[test]
fn truncated_and_garbage_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let (config, tensors) = sample();
    write_adapter(&path, &config, &tensors).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 12, 3, 0] {
        let broken = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&broken, &bytes[..cut]).unwrap();
        expect_format_error(AdapterFile::open(&broken).map(|_| ()), &["safetensors"]);
    }
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    expect_format_error(AdapterFile::open(&garbage).map(|_| ()), &["safetensors"]);
    let missing = AdapterFile::open(dir.path().join("nope.safetensors"));
    assert!(matches!(missing, Err(Error::Io { .. })));
}

#[test]
fn owned_tensor_checks_its_byte_count() {
    let err = OwnedTensor::new("x", St::F32, vec![2, 3], vec![0; 23])
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"x\"") && err.contains("expected 24"), "{err}");
}

#[test]
fn the_same_adapter_is_written_to_the_same_bytes() {
    // safetensors writes its metadata map in a random order; ours is sorted.
    let dir = tempfile::tempdir().unwrap();
    let (config, tensors) = sample();
    let mut files = Vec::new();
    for i in 0..6 {
        let path = dir.path().join(format!("a{i}.safetensors"));
        write_adapter(&path, &config, &tensors).unwrap();
        files.push(std::fs::read(&path).unwrap());
    }
    assert!(files.iter().all(|f| f == &files[0]));
    let header_len = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&files[0][8..8 + header_len]).unwrap();
    let format = header.find("\"format\"").unwrap();
    let config_key = header.find("\"asymlora_config\"").unwrap();
    let version = header.find("\"format_version\"").unwrap();
    assert!(config_key < format && format < version, "{header}");
    AdapterFile::open(dir.path().join("a0.safetensors")).unwrap();
}

#[test]
fn kinds_round_trip_and_linear_modules_keep_their_json() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, mut t) = sample();
    let linear_json = config.to_json();
    assert!(!linear_json.contains("kind") && !linear_json.contains("experts"));
    config.modules.insert(
        "moe.w".to_string(),
        ModuleConfig {
            kind: ModuleKind::Parameter,
            experts: Some(3),
            ..module(12, 6, 10)
        },
    );
    config.modules.insert(
        "conv".to_string(),
        ModuleConfig {
            kind: ModuleKind::Conv,
            kernel: Some(vec![2, 3]),
            ..module(12, 6, 20)
        },
    );
    let b = OwnedTensor::new("moe.w.lora_B", St::F32, vec![3, 6, 4], vec![0; 3 * 6 * 4 * 4]).unwrap();
    t.insert("moe.w.lora_B".into(), b);
    t.insert("conv.lora_B".into(), f32_tensor("conv.lora_B", [6, 4], 0.25));
    let path = dir.path().join("kinds.safetensors");
    write_adapter(&path, &config, &t).unwrap();
    let file = AdapterFile::open(&path).unwrap();
    assert_eq!(file.config(), &config);
    let m = &config.modules["moe.w"];
    let FactorA::Generated(a) = file.lora_a("moe.w").unwrap() else {
        panic!("a seeded A")
    };
    assert_eq!(a.len(), 3 * 4 * 12);
    let second = random_orthogonal(&config.block_a_spec(m, 1), Dtype::F32).unwrap();
    assert_eq!(&a.to_le_bytes()[4 * 48..8 * 48], &second.to_le_bytes()[..]);
    // experts on streams 10..13: a module on stream 12 collides
    config.modules.insert("other".into(), module(12, 6, 12));
    t.insert("other.lora_B".into(), f32_tensor("other.lora_B", [6, 4], 0.5));
    expect_format_error(
        write_adapter(dir.path().join("x.safetensors"), &config, &t),
        &["stream", "overlaps streams 10..13", "moe.w"],
    );
    config.modules.remove("other");
    config.modules.get_mut("conv").unwrap().kernel = Some(vec![5]);
    expect_format_error(
        write_adapter(dir.path().join("x.safetensors"), &config, &t),
        &["module \"conv\": kernel", "does not divide d_in 12"],
    );
}
