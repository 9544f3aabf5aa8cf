//! The pinned outputs of generator haar-v1 (docs/haar-v1-test-vectors.json, checked
//! with 1, 2 and 8 threads; docs/haar-v1-f64-vectors.json, with 1 and 8), and the
//! published ziggurat tables (docs/haar-v1-ziggurat-tables.json) against the literals. A failure here means the bits changed: that is a new
//! generator, not a fix to this one.

use std::path::PathBuf;

use asymlora_core::orthogonal::{gaussian_matrix, random_orthogonal_f64};
use asymlora_core::{random_orthogonal, random_orthogonal_many, Dtype, Matrix, OrthogonalSpec};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn vectors() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/haar-v1-test-vectors.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("test vectors present")).unwrap()
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().expect("integer")
}

fn spec_of(v: &Value) -> (OrthogonalSpec, Dtype) {
    let spec = OrthogonalSpec::new(
        u64_of(&v["r"]) as usize,
        u64_of(&v["d_in"]) as usize,
        u64_of(&v["seed"]),
        u64_of(&v["stream"]),
    )
    .with_gain(v.get("gain").and_then(Value::as_f64).unwrap_or(1.0));
    (spec, v["dtype"].as_str().unwrap().parse().unwrap())
}

fn hex_bits(m: &Matrix) -> Vec<String> {
    match m {
        Matrix::F32(v) => v.iter().map(|x| format!("{:08x}", x.to_bits())).collect(),
        Matrix::F16(v) => v.iter().map(|x| format!("{:04x}", x.to_bits())).collect(),
        Matrix::BF16(v) => v.iter().map(|x| format!("{:04x}", x.to_bits())).collect(),
    }
}

fn sha256_hex(m: &Matrix) -> String {
    Sha256::digest(m.to_le_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn gaussian_vectors() {
    let v = vectors();
    for case in v["gaussian"].as_array().unwrap() {
        let (r, d) = (u64_of(&case["r"]) as usize, u64_of(&case["d_in"]) as usize);
        for threads in [1, 2, 8] {
            let g = with_threads(threads, || {
                gaussian_matrix(r, d, u64_of(&case["seed"]), u64_of(&case["stream"]))
            });
            let got: Vec<String> = g.iter().map(|x| format!("{:016x}", x.to_bits())).collect();
            let want: Vec<String> = case["values_f64_bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            assert_eq!(got, want, "gaussian {case} with {threads} threads");
        }
    }
}

#[test]
fn small_matrices_in_full() {
    let v = vectors();
    for case in v["small"].as_array().unwrap() {
        let (spec, dtype) = spec_of(case);
        let want: Vec<String> = case["bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        for threads in [1, 2, 8] {
            let m = with_threads(threads, || random_orthogonal(&spec, dtype).unwrap());
            assert_eq!(hex_bits(&m), want, "{case} with {threads} threads");
        }
    }
}

#[test]
fn large_matrices_by_sha256() {
    let v = vectors();
    let cases = v["sha256"].as_array().unwrap();
    for threads in [1, 2, 8] {
        for case in cases {
            let (spec, dtype) = spec_of(case);
            let m = with_threads(threads, || random_orthogonal(&spec, dtype).unwrap());
            assert_eq!(
                sha256_hex(&m),
                case["sha256"].as_str().unwrap(),
                "{case} with {threads} threads"
            );
        }
    }
}

#[test]
fn batched_equals_single_with_any_thread_count() {
    let v = vectors();
    let cases: Vec<_> = v["sha256"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["dtype"] == "float32")
        .collect();
    let specs: Vec<_> = cases.iter().map(|c| spec_of(c).0).collect();
    for threads in [1, 2, 8] {
        let many = with_threads(threads, || random_orthogonal_many(&specs, Dtype::F32).unwrap());
        for (m, case) in many.iter().zip(&cases) {
            assert_eq!(
                sha256_hex(m),
                case["sha256"].as_str().unwrap(),
                "batched {case} with {threads} threads"
            );
        }
    }
}

/// Set to `1` to (re)write the generated docs files instead of checking them. Only for
/// adding cases: a change to a published value is a new generator.
const WRITE_ENV: &str = "ASYMLORA_WRITE_GOLDEN";

fn docs_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs").join(name)
}

/// Checks that `docs/<name>` is exactly `text` (or writes it, under [`WRITE_ENV`]).
fn check_or_write_doc(name: &str, text: &str) {
    let path = docs_path(name);
    if std::env::var(WRITE_ENV).as_deref() == Ok("1") {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == text,
        "{} differs from what the code gives; rerun with {WRITE_ENV}=1 only if you added cases",
        path.display()
    );
}

fn f64_hex(x: f64) -> String {
    format!("{:016x}", x.to_bits())
}

fn sha256_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn f64_le_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn ziggurat_tables_doc_equals_the_literals() {
    use asymlora_core::prng::{ZIG_F, ZIG_R, ZIG_V, ZIG_X};
    let all: Vec<f64> = ZIG_X.iter().chain(ZIG_F.iter()).copied().collect();
    let doc = serde_json::json!({
        "generator": "haar-v1",
        "note": "Ziggurat tables of haar-v1 (authoritative). X_f64_bits[i] = X[i], F_f64_bits[i] = F[i] \
                 as IEEE-754 binary64 bit patterns (16 hex digits, most significant first). sha256 is \
                 over X[0..=256] then F[0..=256], each as 8 little-endian bytes (4112 bytes). Generated \
                 from rust/asymlora-core/src/prng/ziggurat_tables.rs by tests/golden.rs; never edit.",
        "layers": 256,
        "R_f64_bits": f64_hex(ZIG_R),
        "V_f64_bits": f64_hex(ZIG_V),
        "X_f64_bits": ZIG_X.iter().map(|&x| f64_hex(x)).collect::<Vec<_>>(),
        "F_f64_bits": ZIG_F.iter().map(|&x| f64_hex(x)).collect::<Vec<_>>(),
        "sha256": sha256_of(&f64_le_bytes(&all)),
    });
    check_or_write_doc(
        "haar-v1-ziggurat-tables.json",
        &(serde_json::to_string_pretty(&doc).unwrap() + "\n"),
    );
}

/// Rows whose first `d_in` normals take every rare path of the ziggurat (seeds found by
/// a search over row 0; tests/test_spec_reference.py checks that together they take
/// each path): (d_in, seed, stream, what it covers).
const DRAW_CASES: [(usize, u64, u64, &str); 3] = [
    (32, 230, 0, "tail, one rejected wedge"),
    (39, 909, 0, "tail with one rejected tail pair"),
    (48, 1790, 0, "tail, two accepted and two rejected wedges, layer 255"),
];
/// Shapes whose float64 G and A are pinned by SHA-256: those of the `sha256` vectors.
const F64_SHA_CASES: [(usize, usize, u64, u64); 5] = [
    (16, 4096, 0, 0),
    (16, 11008, 0, 6),
    (64, 4096, 1234, 99),
    (8, 1000, 7, 3),
    (128, 128, 3, 1),
];
/// Small A in full binary64: (r, d_in, seed, stream, gain).
const A_F64_CASES: [(usize, usize, u64, u64, f64); 4] = [
    (2, 5, 0, 0, 1.0),
    (3, 8, 42, 7, 1.0),
    (4, 37, 1, 2, 1.0),
    (3, 20, 11, 5, -1.7),
];
/// Small A rounded with a gain that is not a power of two (so scaling after rounding differs).
const ROUNDED_CASES: [(usize, usize, u64, u64, f64, &str); 3] = [
    (3, 20, 11, 5, 0.3, "float32"),
    (3, 20, 11, 5, 0.3, "float16"),
    (3, 20, 11, 5, 0.3, "bfloat16"),
];

/// The first `d_in` normals of row 0 and the number of 64-bit draws each one used.
fn traced_row(d_in: usize, seed: u64, stream: u64) -> (Vec<f64>, Vec<u128>) {
    let mut rng = asymlora_core::prng::row_rng(seed, stream, 0);
    (0..d_in)
        .map(|_| {
            let before = rng.get_word_pos();
            let z = asymlora_core::prng::standard_normal(&mut rng);
            (z, (rng.get_word_pos() - before) / 2)
        })
        .unzip()
}

fn f64_vectors_doc() -> Value {
    use serde_json::json;
    let draws: Vec<Value> = DRAW_CASES
        .iter()
        .map(|&(d_in, seed, stream, covers)| {
            let (values, used) = traced_row(d_in, seed, stream);
            json!({"r": 1, "d_in": d_in, "seed": seed, "stream": stream, "covers": covers,
                   "values_f64_bits": values.iter().map(|&x| f64_hex(x)).collect::<Vec<_>>(),
                   "draws_used": used})
        })
        .collect();
    let g_sha: Vec<Value> = F64_SHA_CASES
        .iter()
        .map(|&(r, d_in, seed, stream)| {
            let g = gaussian_matrix(r, d_in, seed, stream);
            json!({"r": r, "d_in": d_in, "seed": seed, "stream": stream, "sha256": sha256_of(&f64_le_bytes(&g))})
        })
        .collect();
    let a_sha: Vec<Value> = F64_SHA_CASES
        .iter()
        .map(|&(r, d_in, seed, stream)| {
            let a = random_orthogonal_f64(&OrthogonalSpec::new(r, d_in, seed, stream)).unwrap();
            json!({"r": r, "d_in": d_in, "seed": seed, "stream": stream, "gain": 1.0,
                   "sha256": sha256_of(&f64_le_bytes(&a))})
        })
        .collect();
    let a_small: Vec<Value> = A_F64_CASES
        .iter()
        .map(|&(r, d_in, seed, stream, gain)| {
            let a = random_orthogonal_f64(&OrthogonalSpec::new(r, d_in, seed, stream).with_gain(gain)).unwrap();
            json!({"r": r, "d_in": d_in, "seed": seed, "stream": stream, "gain": gain,
                   "values_f64_bits": a.iter().map(|&x| f64_hex(x)).collect::<Vec<_>>()})
        })
        .collect();
    let rounded: Vec<Value> = ROUNDED_CASES
        .iter()
        .map(|&(r, d_in, seed, stream, gain, dtype)| {
            let spec = OrthogonalSpec::new(r, d_in, seed, stream).with_gain(gain);
            let m = random_orthogonal(&spec, dtype.parse().unwrap()).unwrap();
            json!({"r": r, "d_in": d_in, "seed": seed, "stream": stream, "gain": gain, "dtype": dtype,
                   "bits": hex_bits(&m)})
        })
        .collect();
    json!({
        "generator": "haar-v1",
        "note": "Full-precision vectors of haar-v1, complementing haar-v1-test-vectors.json: they pin \
                 the binary64 path that rounding to the output dtype hides. Bit patterns as 16 hex \
                 digits (most significant first); sha256 over the little-endian bytes of the row-major \
                 binary64 array. Generated by rust/asymlora-core/tests/golden.rs; never edit values.",
        "gaussian_draws": draws,
        "gaussian_sha256": g_sha,
        "a_f64": a_small,
        "a_f64_sha256": a_sha,
        "rounded": rounded,
    })
}

#[test]
fn f64_vectors_doc_equals_the_code() {
    for threads in [1, 8] {
        let doc = with_threads(threads, f64_vectors_doc);
        check_or_write_doc(
            "haar-v1-f64-vectors.json",
            &(serde_json::to_string_pretty(&doc).unwrap() + "\n"),
        );
    }
}
