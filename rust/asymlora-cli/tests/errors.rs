//! Every CLI error is one line on stderr (`asymlora: error: ...`) naming the argument
//! or the file, with a non-zero exit code and nothing on stdout: usage errors from
//! the argument parser (several lines in clap's own rendering), bad `ADAPTER:WEIGHT`
//! and `OLD=NEW` arguments, and bad files (multi-line JSON and regex errors included).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use asymlora_core::adapter::{write_adapter, AdapterConfig, ModuleConfig, OwnedTensor, Scaling, META_CONFIG};
use asymlora_core::io::write_safetensors;
use asymlora_core::Dtype;
use safetensors::Dtype as St;

fn f32_tensor(name: &str, shape: &[usize]) -> (String, OwnedTensor) {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
    (
        name.to_string(),
        OwnedTensor::new(name, St::F32, shape.to_vec(), data).unwrap(),
    )
}

fn adapter_config() -> AdapterConfig {
    AdapterConfig {
        rank: 2,
        alpha: 4.0,
        scaling: Scaling::AlphaOverR,
        seed: 1,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules: BTreeMap::from([("proj".to_string(), ModuleConfig::linear(8, 6, 0, false))]),
        full_tensors: vec![],
        base_model: None,
    }
}

/// A base file, an adapter for it and bad files of every kind, in `dir`.
fn write_inputs(dir: &Path) {
    let base = BTreeMap::from([f32_tensor("proj.weight", &[6, 8])]);
    write_safetensors(dir.join("base.safetensors"), &base, &BTreeMap::new()).unwrap();
    let b = BTreeMap::from([f32_tensor("proj.lora_B", &[6, 2])]);
    write_adapter(dir.join("a.safetensors"), &adapter_config(), &b).unwrap();
    let bytes = fs::read(dir.join("a.safetensors")).unwrap();
    fs::write(dir.join("cut.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fs::write(
        dir.join("garbage.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\xffnot json",
    )
    .unwrap();

    let mut config: serde_json::Value = serde_json::from_str(&adapter_config().to_json()).unwrap();
    config["scaling"] = false.into();
    let meta = BTreeMap::from([
        ("format".to_string(), "asymlora".to_string()),
        ("format_version".to_string(), "1".to_string()),
        (META_CONFIG.to_string(), config.to_string()),
    ]);
    write_safetensors(dir.join("wrongtype.safetensors"), &b, &meta).unwrap();

    // PEFT directories whose config is wrong in different ways.
    let peft_tensors = BTreeMap::from([
        f32_tensor("base_model.model.proj.lora_A.weight", &[2, 8]),
        f32_tensor("base_model.model.proj.lora_B.weight", &[6, 2]),
    ]);
    for (name, config) in [
        // A JSON error in a pretty-printed file: serde_json gives line and column.
        ("peft-json", "{\n  \"peft_type\": \"LORA\",\n  \"r\": 2,\n".to_string()),
        (
            "peft-regex",
            r#"{"peft_type": "LORA", "r": 2, "rank_pattern": {"proj(": 2}}"#.to_string(),
        ),
        (
            "peft-bool",
            r#"{"peft_type": "LORA", "r": 2, "use_dora": "false"}"#.to_string(),
        ),
    ] {
        let d = dir.join(name);
        fs::create_dir(&d).unwrap();
        fs::write(d.join("adapter_config.json"), config).unwrap();
        write_safetensors(d.join("adapter_model.safetensors"), &peft_tensors, &BTreeMap::new()).unwrap();
    }

    // A sharded base whose index is not JSON.
    let sharded = dir.join("sharded");
    fs::create_dir(&sharded).unwrap();
    write_safetensors(
        sharded.join("model-00001-of-00001.safetensors"),
        &base,
        &BTreeMap::new(),
    )
    .unwrap();
    fs::write(sharded.join("model.safetensors.index.json"), "{\n  \"weight_map\": {\n").unwrap();
}

#[test]
fn every_error_is_one_line_naming_the_argument_or_file() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let merge = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["merge", "base.safetensors", "a.safetensors", "-o", "out.safetensors"];
        args.extend_from_slice(extra);
        args
    };
    // (arguments, exit code, what the line must name)
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        // Usage errors (exit 2), one line instead of clap's error, usage and tip.
        (vec!["merge", "base.safetensors", "a.safetensors"], 2, vec!["--out"]),
        (vec!["merge", "base.safetensors", "-o", "o"], 2, vec!["ADAPTER"]),
        (merge(&["--dtype", "int8"]), 2, vec!["--dtype", "int8"]),
        (merge(&["--threads", "0"]), 2, vec!["--threads"]),
        (merge(&["--threads", "many"]), 2, vec!["--threads", "many"]),
        (merge(&["--prefix-map", "x"]), 2, vec!["--prefix-map", "`prefix_map`"]),
        (merge(&["--prefix-map", "a.=a."]), 2, vec!["--prefix-map", "OLD != NEW"]),
        (merge(&["--bogus"]), 2, vec!["--bogus"]),
        (
            vec!["merge", "base.safetensors", "a.safetensors:half", "-o", "o"],
            2,
            vec!["`adapters`", "a.safetensors:half", "\"half\" is not a number"],
        ),
        (
            vec!["merge", "base.safetensors", "a.safetensors:inf", "-o", "o"],
            2,
            vec!["`adapters`", "finite"],
        ),
        (vec!["frobnicate"], 2, vec!["frobnicate"]),
        (vec!["inspect"], 2, vec!["ADAPTER"]),
        (vec!["import-peft", "peft-bool"], 2, vec!["--out"]),
        (
            vec!["import-peft", "peft-bool", "-o", "x", "--seed=-1"],
            2,
            vec!["--seed"],
        ),
        // Bad files and values (exit 1).
        (vec!["inspect", "missing.safetensors"], 1, vec!["missing.safetensors"]),
        (vec!["inspect", "garbage.safetensors"], 1, vec!["garbage.safetensors"]),
        (vec!["inspect", "cut.safetensors"], 1, vec!["cut.safetensors"]),
        (
            vec!["inspect", "base.safetensors"],
            1,
            vec!["base.safetensors", "__metadata__"],
        ),
        (
            vec!["inspect", "wrongtype.safetensors"],
            1,
            vec!["wrongtype.safetensors", "field scaling", "boolean"],
        ),
        (
            vec!["combine", "a.safetensors:half", "-o", "c.safetensors"],
            1,
            vec!["`adapters`", "a.safetensors:half"],
        ),
        (vec!["combine", "-o", "c.safetensors"], 1, vec!["`adapters`"]),
        (
            vec!["combine", "a.safetensors", "-o", "c.safetensors", "--b-dtype", "int8"],
            1,
            vec!["int8"],
        ),
        (
            vec!["import-peft", "peft-json", "-o", "p.safetensors"],
            1,
            vec!["peft-json/adapter_config.json", "line 4"],
        ),
        (
            vec!["import-peft", "peft-regex", "-o", "p.safetensors"],
            1,
            vec!["adapter_config.json", "rank_pattern[\"proj(\"]", "unclosed group"],
        ),
        (
            vec!["import-peft", "peft-bool", "-o", "p.safetensors"],
            1,
            vec!["adapter_config.json", "use_dora", "true or false"],
        ),
        (
            vec!["merge", "sharded", "a.safetensors", "-o", "out"],
            1,
            vec!["model.safetensors.index.json", "not valid JSON"],
        ),
        (vec!["merge", "nobase", "a.safetensors", "-o", "out"], 1, vec!["nobase"]),
    ];
    for (args, code, needles) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_asymlora"))
            .current_dir(dir.path())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?}: stdout {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            err.starts_with("asymlora: error: ") && err.ends_with('\n') && err.matches('\n').count() == 1,
            "{args:?}: not one error line: {err:?}"
        );
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        }
    }
    for written in ["out.safetensors", "o", "out", "c.safetensors", "p.safetensors", "x"] {
        assert!(!dir.path().join(written).exists(), "{written} was written");
    }
}

#[test]
fn help_and_version_still_go_to_stdout() {
    for args in [&["--help"][..], &["merge", "--help"], &["--version"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_asymlora"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty() && out.stderr.is_empty(), "{args:?}");
    }
}
