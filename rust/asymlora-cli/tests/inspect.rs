//! The standalone `asymlora` binary on real adapter files.

use std::collections::BTreeMap;
use std::process::Command;

use asymlora_core::adapter::{write_adapter, AdapterConfig, ModuleConfig, OwnedTensor, Scaling};
use asymlora_core::Dtype;

fn asymlora(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_asymlora"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn inspect_prints_modules_sizes_and_lora_equivalent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let mut modules = BTreeMap::new();
    modules.insert(
        "model.layers.0.self_attn.q_proj".to_string(),
        ModuleConfig::linear(64, 64, 3, false),
    );
    let config = AdapterConfig {
        rank: 8,
        alpha: 16.0,
        scaling: Scaling::AlphaOverR,
        seed: 1234,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors: vec![],
        base_model: None,
    };
    let b = OwnedTensor::new("b", safetensors::Dtype::F32, vec![64, 8], vec![0; 64 * 8 * 4]).unwrap();
    let tensors = BTreeMap::from([("model.layers.0.self_attn.q_proj.lora_B".to_string(), b)]);
    write_adapter(&path, &config, &tensors).unwrap();

    let out = asymlora(&["inspect".as_ref(), path.as_os_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "model.layers.0.self_attn.q_proj",
        "64 x 64",
        "seed 1234",
        "haar-v1",
        "rank        8",
        "seeded",
        "as LoRA",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(text.contains(&format!("({size} bytes)")), "{text}");
    // LoRA would add A: 8 x 64 float32 = 2048 bytes.
    assert!(
        text.contains(&format!("({} bytes, every A stored", size + 2048)),
        "{text}"
    );
}

#[test]
fn inspect_of_a_bad_file_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, b"garbage").unwrap();
    let out = asymlora(&["inspect".as_ref(), path.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("asymlora: error: ") && err.contains("bad.safetensors"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let out = asymlora(&["frobnicate".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
}
