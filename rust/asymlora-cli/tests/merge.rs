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
        modules.insert(m.clone(), ModuleConfig::linear(cols, rows, l as u64, false));
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

/// A model directory of 16 weights of 2048 x 2048 (128 MiB of bf16) and an adapter in
/// `dir`: long enough for a merge to be interrupted.
#[cfg(unix)]
fn big_model(dir: &Path) {
    fs::create_dir(dir.join("model")).unwrap();
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
    write_safetensors(dir.join("model").join("model.safetensors"), &t, &BTreeMap::new()).unwrap();
    adapter(&dir.join("a.safetensors"), 16, 2048, 2048);
}

#[cfg(unix)]
fn spawn_merge(dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_asymlora"))
        .current_dir(dir)
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
        .unwrap()
}

/// Waits until the merge's temporary output exists.
#[cfg(unix)]
fn wait_for_temporary(dir: &Path, child: &mut std::process::Child) {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    while hidden_entries(dir).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no temporary output appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(unix)]
fn send(signal: &str, child: &std::process::Child) {
    let kill = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

#[cfg(unix)]
#[test]
fn signals_stop_the_merge_and_leave_nothing() {
    for (signal, code) in [("INT", 130), ("TERM", 143), ("HUP", 129)] {
        let dir = tempfile::tempdir().unwrap();
        big_model(dir.path());
        let mut child = spawn_merge(dir.path());
        wait_for_temporary(dir.path(), &mut child);
        send(signal, &child);
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {err}");
        assert_eq!(
            err,
            format!("asymlora: interrupted by SIG{signal}; nothing was written\n")
        );
        assert!(!dir.path().join("out").exists());
        assert!(
            hidden_entries(dir.path()).is_empty(),
            "{:?}",
            hidden_entries(dir.path())
        );
    }
}

/// SIGTERM soon after the start, at several delays: the process is either killed by
/// the default action before it wrote anything, or stops cleanly, or finished; it never
/// leaves a temporary (an earlier version did, 0.3 s in).
#[cfg(unix)]
#[test]
fn an_early_sigterm_leaves_no_temporary() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    big_model(dir.path());
    for delay_ms in [0u64, 2, 5, 10, 20, 50, 100, 300] {
        let child = spawn_merge(dir.path());
        std::thread::sleep(Duration::from_millis(delay_ms));
        send("TERM", &child);
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        let how = (out.status.code(), out.status.signal());
        assert!(
            matches!(how, (None, Some(15)) | (Some(143), None)),
            "{delay_ms} ms: {how:?} {err}"
        );
        if how.0 == Some(143) {
            assert_eq!(err, "asymlora: interrupted by SIGTERM; nothing was written\n");
        }
        assert!(!dir.path().join("out").exists(), "{delay_ms} ms");
        assert!(
            hidden_entries(dir.path()).is_empty(),
            "{delay_ms} ms: {:?}",
            hidden_entries(dir.path())
        );
    }
}

#[cfg(target_os = "linux")]
#[test]
fn the_next_merge_removes_what_a_killed_one_left() {
    let dir = tempfile::tempdir().unwrap();
    big_model(dir.path());
    let mut child = spawn_merge(dir.path());
    wait_for_temporary(dir.path(), &mut child);
    send("KILL", &child);
    child.wait().unwrap();
    let left = hidden_entries(dir.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with(".out.asymlora-") && left[0].ends_with(".tmp"),
        "{left:?}"
    );
    let marker = fs::read_to_string(dir.path().join(&left[0]).join("asymlora-merge-owner")).unwrap();
    assert!(marker.starts_with("asymlora merge temporary v1\npid "), "{marker}");
    // Beside it: a hidden directory of the same pattern without a marker, not ours.
    let foreign = dir.path().join(".out.asymlora-user.tmp");
    fs::create_dir(&foreign).unwrap();

    // The next merge into the same OUT (of a small model, to be quick).
    fs::create_dir(dir.path().join("small")).unwrap();
    base(&dir.path().join("small").join("model.safetensors"), 2, 16, 32);
    adapter(&dir.path().join("small.safetensors"), 2, 16, 32);
    let p = |n: &str| dir.path().join(n).into_os_string();
    let out = asymlora(&[
        "merge".into(),
        p("small"),
        p("small.safetensors"),
        "-o".into(),
        p("out"),
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("stale")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].starts_with("asymlora: warning: removed 1 stale temporary output(s) of interrupted merges into ")
            && warnings[0].contains(&left[0])
            && warnings[0].contains(&format!("(process {})", child.id())),
        "{err}"
    );
    assert_eq!(hidden_entries(dir.path()), vec![".out.asymlora-user.tmp".to_string()]);
    let merged = SafetensorsFile::open(dir.path().join("out").join("model.safetensors")).unwrap();
    assert_eq!(merged.tensors_in_file_order().len(), 3);
}
