//! `asymlora merge` / `asymlora unmerge` through the standalone binary: exit codes,
//! one-line errors without panics, nothing written on failure, Ctrl-C.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use asymlora_core::adapter::{write_adapter, AdapterConfig, ModuleConfig, OwnedTensor, Scaling};
use asymlora_core::io::{write_safetensors, SafetensorsFile};
use asymlora_core::{Dtype, Matrix};
use safetensors::Dtype as St;

fn asymlora<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asymlora"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn bf16(name: &str, shape: &[usize], values: &[f64]) -> (String, OwnedTensor) {
    let data = Matrix::round_from_f64(values, Dtype::BF16).to_le_bytes();
    (
        name.into(),
        OwnedTensor::new(name, St::BF16, shape.to_vec(), data).unwrap(),
    )
}

fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A base file with `layers` weights of `rows` x `cols` (bf16), plus an embedding.
fn base(path: &Path, layers: usize, rows: usize, cols: usize) {
    let mut t: BTreeMap<String, OwnedTensor> = BTreeMap::new();
    for l in 0..layers {
        let (n, v) = bf16(
            &format!("layers.{l}.proj.weight"),
            &[rows, cols],
            &values(rows * cols, l as u64, 0.05),
        );
        t.insert(n, v);
    }
    let (n, v) = bf16("embed.weight", &[10, cols], &values(10 * cols, 99, 1.0));
    t.insert(n, v);
    write_safetensors(path, &t, &BTreeMap::from([("format".into(), "pt".into())])).unwrap();
}

fn adapter(path: &Path, layers: usize, rows: usize, cols: usize) {
    let mut modules = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for l in 0..layers {
        let m = format!("layers.{l}.proj");
        modules.insert(
            m.clone(),
            ModuleConfig {
                d_in: cols,
                d_out: rows,
                stream: l as u64,
                a_stored: false,
                rank: None,
                alpha: None,
            },
        );
        let b = values(rows * 8, 1000 + l as u64, 0.1);
        let data: Vec<u8> = b.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
        let name = format!("{m}.lora_B");
        tensors.insert(
            name.clone(),
            OwnedTensor::new(&name, St::F32, vec![rows, 8], data).unwrap(),
        );
    }
    let config = AdapterConfig {
        rank: 8,
        alpha: 16.0,
        scaling: Scaling::AlphaOverR,
        seed: 3,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors: vec![],
        base_model: None,
    };
    write_adapter(path, &config, &tensors).unwrap();
}

fn bf16_values(path: &Path, name: &str) -> Vec<f64> {
    let st = SafetensorsFile::open(path).unwrap();
    let (_, bytes) = st.tensor(name).unwrap();
    bytes
        .chunks_exact(2)
        .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16) as f64)
        .collect()
}

fn hidden_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn merge_then_unmerge_round_trips_within_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    base(&p("base.safetensors"), 2, 24, 40);
    adapter(&p("a.safetensors"), 2, 24, 40);
    let out = asymlora(&[
        "merge".as_ref(),
        p("base.safetensors").as_os_str(),
        format!("{}:0.5", p("a.safetensors").display()).as_ref(),
        "-o".as_ref(),
        p("m.safetensors").as_os_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("merged 2 weight(s) (2 module(s) from 1 adapter(s))"),
        "{err}"
    );
    assert!(
        !err.contains('\r'),
        "no progress bar when stderr is not a terminal: {err:?}"
    );
    let quiet = asymlora(&[
        p("m.safetensors").as_os_str(),
        "a.safetensors:0.5".as_ref(),
        "-o".as_ref(),
        p("u.safetensors").as_os_str(),
        "--quiet".as_ref(),
    ]);
    assert_eq!(quiet.status.code(), Some(2), "no subcommand: usage error");
    let un = Command::new(env!("CARGO_BIN_EXE_asymlora"))
        .current_dir(dir.path())
        .args([
            "unmerge",
            "m.safetensors",
            "a.safetensors:0.5",
            "-o",
            "u.safetensors",
            "--quiet",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(un.status.success(), "{}", text(&un.stderr));
    assert!(un.stderr.is_empty(), "--quiet: {}", text(&un.stderr));
    for l in 0..2 {
        let name = format!("layers.{l}.proj.weight");
        let (w, m, u) = (
            bf16_values(&p("base.safetensors"), &name),
            bf16_values(&p("m.safetensors"), &name),
            bf16_values(&p("u.safetensors"), &name),
        );
        assert!(w.iter().zip(&m).any(|(a, b)| a != b), "the merge changed {name}");
        let same = w.iter().zip(&u).filter(|(a, b)| a == b).count();
        assert!(
            same * 2 > w.len(),
            "{name}: unmerge restores most values exactly ({same}/{})",
            w.len()
        );
        // Each way rounds once: the difference is within an ulp of the merged value.
        for ((a, b), mv) in w.iter().zip(&u).zip(&m) {
            assert!(
                (a - b).abs() <= (a.abs() + mv.abs()) * 2f64.powi(-7),
                "{a} vs {b} (merged {mv})"
            );
        }
    }
    // Untouched tensors are bit for bit the same after both.
    let st = SafetensorsFile::open(p("u.safetensors")).unwrap();
    let base_st = SafetensorsFile::open(p("base.safetensors")).unwrap();
    assert_eq!(
        st.tensor("embed.weight").unwrap().1,
        base_st.tensor("embed.weight").unwrap().1
    );
}

#[test]
fn errors_are_one_line_with_exit_code_1_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    base(&p("base.safetensors"), 1, 24, 40);
    adapter(&p("a.safetensors"), 1, 24, 40);
    adapter(&p("wrong.safetensors"), 1, 24, 48);
    fs::write(p("corrupt.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}").unwrap();
    fs::write(p("exists.safetensors"), b"keep me").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["merge", "base.safetensors", "wrong.safetensors", "-o", "o.safetensors"],
            "shape [24, 40]",
        ),
        (
            &["merge", "corrupt.safetensors", "a.safetensors", "-o", "o.safetensors"],
            "corrupt.safetensors",
        ),
        (
            &[
                "merge",
                "base.safetensors",
                "corrupt.safetensors",
                "-o",
                "o.safetensors",
            ],
            "corrupt.safetensors",
        ),
        (
            &["merge", "base.safetensors", "a.safetensors", "-o", "exists.safetensors"],
            "already exists",
        ),
        (
            &[
                "merge",
                "base.safetensors",
                "missing.safetensors",
                "-o",
                "o.safetensors",
            ],
            "missing.safetensors",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_asymlora"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("asymlora: error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!p("o.safetensors").exists());
        assert_eq!(fs::read(p("exists.safetensors")).unwrap(), b"keep me");
        assert!(hidden_entries(dir.path()).is_empty());
    }
    // --force replaces it
    let out = Command::new(env!("CARGO_BIN_EXE_asymlora"))
        .current_dir(dir.path())
        .args([
            "merge",
            "base.safetensors",
            "a.safetensors",
            "-o",
            "exists.safetensors",
            "--force",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(SafetensorsFile::open(p("exists.safetensors")).is_ok());
}

#[test]
fn bad_arguments_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    base(&p("base.safetensors"), 1, 8, 8);
    adapter(&p("a.safetensors"), 1, 8, 8);
    for (args, needle) in [
        (vec!["merge", "base.safetensors", "a.safetensors"], "--out"),
        (vec!["merge", "base.safetensors", "-o", "o"], "ADAPTER"),
        (
            vec![
                "merge",
                "base.safetensors",
                "a.safetensors",
                "-o",
                "o",
                "--dtype",
                "int8",
            ],
            "unknown dtype",
        ),
        (
            vec!["merge", "base.safetensors", "a.safetensors:x", "-o", "o"],
            "not a number",
        ),
        (
            vec!["merge", "base.safetensors", "a.safetensors:inf", "-o", "o"],
            "finite",
        ),
        (
            vec![
                "merge",
                "base.safetensors",
                "a.safetensors",
                "-o",
                "o",
                "--threads",
                "0",
            ],
            "--threads",
        ),
        (
            vec![
                "merge",
                "base.safetensors",
                "a.safetensors",
                "-o",
                "o",
                "--prefix-map",
                "x",
            ],
            "OLD=NEW",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_asymlora"))
            .current_dir(dir.path())
            .args(&args)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!p("o").exists());
    }
    let help = asymlora(&["merge", "--help"]);
    let help = text(&help.stdout);
    for needle in [
        "ADAPTER[:WEIGHT]",
        "--dtype",
        "--threads",
        "--force",
        "--prefix-map",
        "--allow-nonfinite",
        "--quiet",
    ] {
        assert!(help.contains(needle), "{needle} in {help}");
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_merge_and_leaves_nothing() {
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    fs::create_dir(p("model")).unwrap();
    // 16 weights of 2048 x 2048 (128 MiB of bf16): long enough to be interrupted.
    let mut t = BTreeMap::new();
    for l in 0..16 {
        let name = format!("layers.{l}.proj.weight");
        let data: Vec<u8> = (0..2048 * 2048u32)
            .flat_map(|i| (0x3c00 + (i % 997) as u16).to_le_bytes())
            .collect();
        t.insert(
            name.clone(),
            OwnedTensor::new(&name, St::BF16, vec![2048, 2048], data).unwrap(),
        );
    }
    write_safetensors(p("model").join("model.safetensors"), &t, &BTreeMap::new()).unwrap();
    adapter(&p("a.safetensors"), 16, 2048, 2048);
    let mut child = Command::new(env!("CARGO_BIN_EXE_asymlora"))
        .current_dir(dir.path())
        .args([
            "merge",
            "model",
            "a.safetensors",
            "-o",
            "out",
            "--threads",
            "1",
            "--no-fsync",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary output exists (handlers are installed by then).
    let t0 = Instant::now();
    while hidden_entries(dir.path()).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no temporary output appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted; nothing was written"), "{err}");
    assert!(!p("out").exists());
    assert!(
        hidden_entries(dir.path()).is_empty(),
        "{:?}",
        hidden_entries(dir.path())
    );
}
