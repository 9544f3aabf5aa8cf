//! Exact adapter algebra (`combine`): shared-A adapters sum their B, others concatenate;
//! the combined update equals the weighted sum of the inputs' updates up to the one
//! rounding of B, merging the combined adapter matches merging the list within one ulp
//! of the output dtype, and every refusal leaves nothing behind.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use asymlora_core::adapter::{write_adapter, AdapterConfig, AdapterFile, FactorA, ModuleConfig, OwnedTensor, Scaling};
use asymlora_core::combine::{combine, CombineOptions, CombineReport};
use asymlora_core::io::{write_safetensors, SafetensorsFile};
use asymlora_core::merge::{merge, AdapterInput, MergeOptions, Silent};
use asymlora_core::{Dtype, Error};
use safetensors::Dtype as St;

mod common;

use common::{decode, encode, tensor, Rng};

// --------------------------------------------------------------------------- helpers

/// The modules of a tiny model: (name, d_out, d_in).
const MODULES: [(&str, usize, usize); 4] = [
    ("layers.0.attn.q_proj", 40, 40),
    ("layers.0.attn.v_proj", 16, 40),
    ("layers.0.mlp.up_proj", 72, 40),
    ("layers.0.mlp.down_proj", 40, 72),
];

/// How to build one test adapter.
#[derive(Clone)]
struct Spec {
    seed: u64,
    /// seed of the B values (and of stored A values)
    values: u64,
    rank: usize,
    alpha: f64,
    scaling: Scaling,
    b_dtype: St,
    /// `down_proj` stores its A (random values, not orthogonal)
    stored_down: bool,
    /// modules to leave out
    skip: Vec<&'static str>,
    full: bool,
    /// scale of the B values
    b_scale: f64,
}

impl Spec {
    fn new(seed: u64, values: u64) -> Spec {
        Spec {
            seed,
            values,
            rank: 4,
            alpha: 8.0,
            scaling: Scaling::AlphaOverR,
            b_dtype: St::F32,
            stored_down: false,
            skip: vec![],
            full: false,
            b_scale: 0.1,
        }
    }
}

/// Writes an adapter on MODULES: `up_proj` with rank 6 and its own alpha.
fn adapter(path: &Path, spec: &Spec) {
    let mut rng = Rng(spec.values);
    let mut modules = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (k, (m, o, i)) in MODULES.iter().enumerate() {
        if spec.skip.iter().any(|s| m.ends_with(s)) {
            continue;
        }
        let mut mc = ModuleConfig::linear(*i, *o, k as u64, false);
        if m.ends_with("up_proj") {
            mc.rank = Some(6);
            mc.alpha = Some(3.0);
        }
        let r = mc.rank.unwrap_or(spec.rank);
        if m.ends_with("down_proj") && spec.stored_down {
            mc.a_stored = true;
            let (name, t) = tensor(&format!("{m}.lora_A"), St::F32, &[r, *i], &rng.vec(r * i, 0.2));
            tensors.insert(name, t);
        }
        let (name, t) = tensor(
            &format!("{m}.lora_B"),
            spec.b_dtype,
            &[*o, r],
            &rng.vec(o * r, spec.b_scale),
        );
        tensors.insert(name, t);
        modules.insert(m.to_string(), mc);
    }
    let mut full_tensors = vec![];
    if spec.full {
        let (name, t) = tensor("score.weight", St::F32, &[2, 40], &rng.vec(80, 1.0));
        tensors.insert(name.clone(), t);
        full_tensors.push(name);
    }
    let config = AdapterConfig {
        rank: spec.rank,
        alpha: spec.alpha,
        scaling: spec.scaling,
        seed: spec.seed,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors,
        base_model: None,
    };
    write_adapter(path, &config, &tensors).unwrap();
}

/// Per module: `s * B @ A` in f64 and the magnitude `|s| * |B| @ |A|` (for tolerances).
type Deltas = BTreeMap<String, (Vec<f64>, Vec<f64>)>;

fn deltas(path: &Path) -> Deltas {
    let ad = AdapterFile::open(path).unwrap();
    let c = ad.config();
    let mut out = BTreeMap::new();
    for (name, m) in &c.modules {
        let r = c.module_rank(m);
        let a = match ad.lora_a(name).unwrap() {
            FactorA::Generated(mat) => mat.to_f64(),
            FactorA::Stored { info, bytes } => decode(info.dtype, bytes),
        };
        let (bi, bb) = ad.lora_b(name).unwrap();
        let b = decode(bi.dtype, bb);
        let s = c.module_scale(m);
        let mut d = vec![0.0; m.d_out * m.d_in];
        let mut mag = vec![0.0; m.d_out * m.d_in];
        for i in 0..m.d_out {
            for j in 0..m.d_in {
                d[i * m.d_in + j] = s * (0..r).map(|q| b[i * r + q] * a[q * m.d_in + j]).sum::<f64>();
                mag[i * m.d_in + j] = s.abs() * (0..r).map(|q| (b[i * r + q] * a[q * m.d_in + j]).abs()).sum::<f64>();
            }
        }
        out.insert(name.clone(), (d, mag));
    }
    out
}

fn inputs(adapters: &[(&Path, f64)]) -> Vec<AdapterInput> {
    adapters.iter().map(|(p, w)| AdapterInput::new(*p, *w)).collect()
}

fn run(adapters: &[(&Path, f64)], out: &Path) -> Result<CombineReport, Error> {
    combine(&inputs(adapters), out, &CombineOptions::default())
}

/// Checks that `combined`'s delta is `sum_i w_i delta_i` up to rounding B to `unit`
/// (2^-24 for f32) relative to each entry's magnitude; returns the largest error seen
/// in units of that bound.
fn check_sum(combined: &Path, adapters: &[(&Path, f64)], unit: f64) -> f64 {
    let got = deltas(combined);
    let parts: Vec<(Deltas, f64)> = adapters.iter().map(|(p, w)| (deltas(p), *w)).collect();
    let names: std::collections::BTreeSet<&String> = parts.iter().flat_map(|(d, _)| d.keys()).collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), names.into_iter().collect::<Vec<_>>());
    let mut worst: f64 = 0.0;
    for (name, (d, mag)) in &got {
        let mut want = vec![0.0; d.len()];
        let mut want_mag = vec![0.0; d.len()];
        for (p, w) in &parts {
            if let Some((pd, pm)) = p.get(name) {
                for k in 0..d.len() {
                    want[k] += w * pd[k];
                    want_mag[k] += w.abs() * pm[k];
                }
            }
        }
        for k in 0..d.len() {
            // B rounded once: each |B_out[i,q]| error <= unit * |B_out[i,q]|, so the update
            // moves by at most unit * |s| |B_out| @ |A|; f64 adds a little more.
            let bound = unit * mag[k].max(want_mag[k]) + 1e-12 * want_mag[k] + 1e-300;
            let err = (d[k] - want[k]).abs();
            assert!(err <= bound, "{name}[{k}]: {} vs {} (bound {bound:e})", d[k], want[k]);
            worst = worst.max(err / bound);
        }
    }
    worst
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// --------------------------------------------------------------------------- algebra

#[test]
fn shared_a_sums_b_and_keeps_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (pa, pb, pc) = (p("a.safetensors"), p("b.safetensors"), p("c.safetensors"));
    adapter(&p("a.safetensors"), &Spec::new(5, 1));
    adapter(
        &p("b.safetensors"),
        &Spec {
            alpha: 16.0,
            ..Spec::new(5, 2)
        },
    );
    adapter(
        &p("c.safetensors"),
        &Spec {
            alpha: 3.0,
            scaling: Scaling::AlphaOverSqrtR,
            ..Spec::new(5, 3)
        },
    );
    let list = [(pa.as_path(), 1.0), (pb.as_path(), 0.5), (pc.as_path(), -2.0)];
    let report = run(&list, &p("out.safetensors")).unwrap();
    assert_eq!((report.adapters, report.modules), (3, 4));
    assert_eq!((report.shared, report.concatenated, report.stored_a), (4, 0, 0));

    let out = AdapterFile::open(p("out.safetensors")).unwrap();
    let c = out.config();
    assert_eq!((c.seed, c.rank, c.alpha, c.scaling), (5, 4, 8.0, Scaling::AlphaOverR));
    for (name, m) in &c.modules {
        assert!(!m.a_stored, "{name}: A stays seeded");
        let (info, _) = out.lora_b(name).unwrap();
        assert_eq!(info.dtype, St::F32);
    }
    let up = &c.modules["layers.0.mlp.up_proj"];
    assert_eq!((c.module_rank(up), c.module_alpha(up)), (6, 3.0));
    // B is the f64 sum rounded once: recompute it.
    let q = "layers.0.attn.q_proj";
    let s_out = c.module_scale(&c.modules[q]);
    let mut want = vec![0.0; 40 * 4];
    for (path, w) in &list {
        let ad = AdapterFile::open(path).unwrap();
        let m = &ad.config().modules[q];
        let coef = w * ad.config().module_scale(m) / s_out;
        let (info, bytes) = ad.lora_b(q).unwrap();
        for (x, v) in want.iter_mut().zip(decode(info.dtype, bytes)) {
            *x += coef * v;
        }
    }
    assert_eq!(out.lora_b(q).unwrap().1, encode(St::F32, &want).as_slice());
    let worst = check_sum(&p("out.safetensors"), &list, 2f64.powi(-24));
    println!("shared A: worst error {worst:.3} of the f32-rounding bound");
}

#[test]
fn concatenation_when_a_differs() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (pa, pb) = (p("a.safetensors"), p("b.safetensors"));
    adapter(&p("a.safetensors"), &Spec::new(5, 1));
    adapter(
        &p("b.safetensors"),
        &Spec {
            rank: 3,
            stored_down: true,
            scaling: Scaling::AlphaOverSqrtR,
            ..Spec::new(6, 2)
        },
    );
    let list = [(pa.as_path(), 0.75), (pb.as_path(), 1.5)];
    let report = run(&list, &p("out.safetensors")).unwrap();
    assert_eq!((report.shared, report.concatenated, report.stored_a), (0, 4, 4));
    let out = AdapterFile::open(p("out.safetensors")).unwrap();
    let c = out.config();
    let (a, b) = (
        AdapterFile::open(p("a.safetensors")).unwrap(),
        AdapterFile::open(p("b.safetensors")).unwrap(),
    );
    for (name, m) in &c.modules {
        assert!(m.a_stored);
        let ra = a.config().module_rank(&a.config().modules[name]);
        let rb = b.config().module_rank(&b.config().modules[name]);
        assert_eq!(c.module_rank(m), ra + rb, "{name}: ranks add");
        assert_eq!(c.module_scale(m), 1.0, "{name}: s = 1");
        // A = vstack(A_a, A_b), bit for bit.
        let bytes = |ad: &AdapterFile| match ad.lora_a(name).unwrap() {
            FactorA::Generated(mat) => mat.to_le_bytes(),
            FactorA::Stored { bytes, .. } => bytes.to_vec(),
        };
        let want = [bytes(&a), bytes(&b)].concat();
        let FactorA::Stored { info, bytes: got } = out.lora_a(name).unwrap() else {
            panic!("stored")
        };
        assert_eq!(info.dtype, St::F32);
        assert_eq!(got, want.as_slice(), "{name}");
    }
    let worst = check_sum(&p("out.safetensors"), &list, 2f64.powi(-24));
    println!("concatenation: worst error {worst:.3} of the f32-rounding bound");
}

#[test]
fn mixed_groups_partial_modules_and_full_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (pa, pb, pc) = (p("a.safetensors"), p("b.safetensors"), p("c.safetensors"));
    adapter(
        &p("a.safetensors"),
        &Spec {
            full: true,
            skip: vec!["v_proj"],
            ..Spec::new(5, 1)
        },
    );
    adapter(&p("b.safetensors"), &Spec::new(5, 2));
    adapter(
        &p("c.safetensors"),
        &Spec {
            skip: vec!["q_proj"],
            ..Spec::new(9, 3)
        },
    );
    let list = [(pa.as_path(), 1.0), (pb.as_path(), 0.25), (pc.as_path(), 0.5)];
    let report = run(&list, &p("out.safetensors")).unwrap();
    // q: a + b share A; v: b and c differ; up, down: a + b share, c differs.
    assert_eq!((report.modules, report.shared, report.concatenated), (4, 1, 3));
    assert_eq!(report.full_tensors, 1);
    let out = AdapterFile::open(p("out.safetensors")).unwrap();
    let c = out.config();
    assert_eq!(c.full_tensors, ["score.weight"]);
    let a = AdapterFile::open(p("a.safetensors")).unwrap();
    assert_eq!(
        out.tensor("score.weight").unwrap().1,
        a.tensor("score.weight").unwrap().1
    );
    assert!(!c.modules["layers.0.attn.q_proj"].a_stored);
    assert_eq!(c.module_rank(&c.modules["layers.0.attn.v_proj"]), 8);
    assert_eq!(c.module_rank(&c.modules["layers.0.mlp.up_proj"]), 12);
    check_sum(&p("out.safetensors"), &list, 2f64.powi(-24));

    // A module of a single adapter, weighted, from another seed than the output's:
    // its A is stored (regenerated from that seed), B is w * B.
    let only = [(pa.as_path(), 1.0), (pc.as_path(), 0.5)];
    run(&only, &p("out2.safetensors")).unwrap();
    let out2 = AdapterFile::open(p("out2.safetensors")).unwrap();
    let v = &out2.config().modules["layers.0.attn.v_proj"];
    assert!(v.a_stored && out2.config().module_rank(v) == 4);
    check_sum(&p("out2.safetensors"), &only, 2f64.powi(-24));
}

#[test]
fn b_dtypes_common_or_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (pa, pb, pc) = (p("a.safetensors"), p("b.safetensors"), p("c.safetensors"));
    let bf = |values| Spec {
        b_dtype: St::BF16,
        ..Spec::new(5, values)
    };
    adapter(&p("a.safetensors"), &bf(1));
    adapter(&p("b.safetensors"), &bf(2));
    adapter(
        &p("c.safetensors"),
        &Spec {
            b_dtype: St::F16,
            ..Spec::new(5, 3)
        },
    );
    let ab = [(pa.as_path(), 1.0), (pb.as_path(), 1.0)];
    run(&ab, &p("bf.safetensors")).unwrap();
    let dtype = |path: &Path| {
        let ad = AdapterFile::open(path).unwrap();
        ad.lora_b("layers.0.attn.q_proj").unwrap().0.dtype
    };
    assert_eq!(dtype(&p("bf.safetensors")), St::BF16);
    check_sum(&p("bf.safetensors"), &ab, 2f64.powi(-8));
    let ac = [(pa.as_path(), 1.0), (pc.as_path(), 1.0)];
    run(&ac, &p("f32.safetensors")).unwrap();
    assert_eq!(dtype(&p("f32.safetensors")), St::F32);
    let opts = CombineOptions {
        b_dtype: Some(St::F64),
        ..Default::default()
    };
    combine(&inputs(&ac), &p("f64.safetensors"), &opts).unwrap();
    assert_eq!(dtype(&p("f64.safetensors")), St::F64);
    check_sum(&p("f64.safetensors"), &ac, 2f64.powi(-52));
}

#[test]
fn same_bytes_every_time_and_a_weight_one_single_adapter_is_itself() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (pa, pb) = (p("a.safetensors"), p("b.safetensors"));
    adapter(&p("a.safetensors"), &Spec::new(5, 1));
    adapter(&p("b.safetensors"), &Spec::new(6, 2));
    let list = [(pa.as_path(), 0.3), (pb.as_path(), 0.7)];
    run(&list, &p("x.safetensors")).unwrap();
    run(&list, &p("y.safetensors")).unwrap();
    assert_eq!(
        fs::read(p("x.safetensors")).unwrap(),
        fs::read(p("y.safetensors")).unwrap()
    );
    run(&[(pa.as_path(), 1.0)], &p("same.safetensors")).unwrap();
    assert_eq!(
        fs::read(p("a.safetensors")).unwrap(),
        fs::read(p("same.safetensors")).unwrap(),
        "combining one adapter with weight 1 reproduces its file"
    );
}

// --------------------------------------------------------------------------- merge equivalence

/// Base tensors for MODULES (weights `{m}.weight`) plus an untouched one.
fn base(path: &Path, dtype: St) {
    let mut rng = Rng(99);
    let mut t: BTreeMap<String, OwnedTensor> = BTreeMap::new();
    for (m, o, i) in MODULES {
        let (n, x) = tensor(&format!("{m}.weight"), dtype, &[o, i], &rng.vec(o * i, 0.05));
        t.insert(n, x);
    }
    let (n, x) = tensor("score.weight", dtype, &[2, 40], &rng.vec(80, 0.5));
    t.insert(n, x);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(path, &t, &meta).unwrap();
}

/// Values of a merged weight, widened exactly, and the distance to the next value up
/// in the same dtype (one ulp).
fn values_and_ulps(dtype: St, bytes: &[u8]) -> Vec<(f64, f64)> {
    let values = decode(dtype, bytes);
    values
        .iter()
        .map(|&v| {
            let next = match dtype {
                St::F32 => f32::from_bits((v.abs() as f32).to_bits() + 1) as f64,
                St::BF16 => half::bf16::from_bits(half::bf16::from_f64(v.abs()).to_bits() + 1).to_f64(),
                other => panic!("{other:?}"),
            };
            (v, next - v.abs())
        })
        .collect()
}

/// Ordered integer of a float's bits, so that neighbours differ by one.
fn ordered(dtype: St, bytes: &[u8]) -> Vec<i64> {
    let key = |bits: i64, sign: i64| if bits & sign != 0 { -(bits & (sign - 1)) } else { bits };
    match dtype {
        St::F32 => bytes
            .chunks_exact(4)
            .map(|c| key(u32::from_le_bytes(c.try_into().unwrap()) as i64, 1 << 31))
            .collect(),
        St::BF16 => bytes
            .chunks_exact(2)
            .map(|c| key(u16::from_le_bytes([c[0], c[1]]) as i64, 1 << 15))
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// How a merge of the combined adapter compares with a merge of the list.
#[derive(Default)]
struct Agreement {
    equal: usize,
    total: usize,
    /// largest distance in ulps of the output dtype
    worst: i64,
    /// values more than one ulp apart
    beyond_one: usize,
}

/// Compares two merged checkpoints value by value. Every value must lie within one ulp
/// plus the rounding of the combined B (`unit` times the update's magnitude `mag`).
fn compare(list: &Path, combined: &Path, mags: &Deltas, unit: f64) -> Agreement {
    let (fl, fc) = (
        SafetensorsFile::open(list).unwrap(),
        SafetensorsFile::open(combined).unwrap(),
    );
    let mut agreement = Agreement::default();
    for (m, _, _) in MODULES {
        let name = format!("{m}.weight");
        let (info, bl) = fl.tensor(&name).unwrap();
        let (_, bc) = fc.tensor(&name).unwrap();
        let (ol, oc) = (ordered(info.dtype, bl), ordered(info.dtype, bc));
        let (vl, vc) = (values_and_ulps(info.dtype, bl), values_and_ulps(info.dtype, bc));
        let mag = &mags[m].1;
        for k in 0..ol.len() {
            let distance = (ol[k] - oc[k]).abs();
            agreement.equal += usize::from(distance == 0);
            agreement.beyond_one += usize::from(distance > 1);
            agreement.worst = agreement.worst.max(distance);
            let ((l, ul), (c, uc)) = (vl[k], vc[k]);
            let bound = ul.max(uc) + unit * mag[k] * 1.01;
            assert!((l - c).abs() <= bound, "{name}[{k}]: {l} vs {c} (bound {bound:e})");
        }
        agreement.total += ol.len();
    }
    assert_eq!(
        fl.tensor("score.weight").unwrap().1,
        fc.tensor("score.weight").unwrap().1
    );
    agreement
}

#[test]
fn merging_the_combined_adapter_matches_merging_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (pa, pb, pc) = (p("a.safetensors"), p("b.safetensors"), p("c.safetensors"));
    let opts = MergeOptions {
        fsync: false,
        ..Default::default()
    };
    // Base weights are uniform in (-0.05, 0.05); B scale 0.1 gives updates about as
    // large as the weights (many near-cancellations), 0.002 about 2% of them.
    for b_scale in [0.1, 0.002] {
        adapter(
            &pa,
            &Spec {
                b_scale,
                ..Spec::new(5, 1)
            },
        );
        adapter(
            &pb,
            &Spec {
                alpha: 16.0,
                b_scale,
                ..Spec::new(5, 2)
            },
        );
        adapter(
            &pc,
            &Spec {
                rank: 3,
                stored_down: true,
                b_scale,
                ..Spec::new(6, 3)
            },
        );
        let shared = [(pa.as_path(), 0.6), (pb.as_path(), 0.4)];
        let concat = [(pa.as_path(), 1.0), (pc.as_path(), -0.5)];
        for (case, list) in [("shared A", &shared[..]), ("concatenated", &concat[..])] {
            for (b_dtype, unit) in [(St::F32, 2f64.powi(-24)), (St::F64, 2f64.powi(-50))] {
                let combined = p("combined.safetensors");
                let o = CombineOptions {
                    b_dtype: Some(b_dtype),
                    force: true,
                };
                combine(&inputs(list), &combined, &o).unwrap();
                let mags = deltas(&combined);
                for dtype in [St::F32, St::BF16] {
                    let b = p(&format!("base-{dtype}.safetensors"));
                    base(&b, dtype);
                    let (ml, mc) = (p("merged-list.safetensors"), p("merged-combined.safetensors"));
                    merge(&b, &inputs(list), &ml, &opts, &mut Silent).unwrap();
                    merge(&b, &inputs(&[(&combined, 1.0)]), &mc, &opts, &mut Silent).unwrap();
                    let g = compare(&ml, &mc, &mags, unit);
                    println!(
                        "B scale {b_scale}, {case}, {b_dtype} B, {dtype} base: {}/{} = {:.4} bit-equal, max {} ulp, \
                         {} beyond 1 ulp",
                        g.equal,
                        g.total,
                        g.equal as f64 / g.total as f64,
                        g.worst,
                        g.beyond_one
                    );
                    // An f32 B moves a float32 merge by up to 2^-24 of the update, which
                    // is more than an ulp of W' where W' nearly cancels (checked in
                    // `compare`); a bf16 output, or an f64 B, stays within one ulp.
                    if dtype == St::BF16 || b_dtype == St::F64 {
                        assert!(g.worst <= 1, "{case}, {b_dtype} B, {dtype}: {} ulp", g.worst);
                    }
                    fs::remove_file(ml).unwrap();
                    fs::remove_file(mc).unwrap();
                }
            }
        }
    }
}

// --------------------------------------------------------------------------- PEFT

#[test]
fn peft_directories_combine_through_the_one_reader() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let peft = p("peft");
    fs::create_dir_all(&peft).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false, "fan_in_fan_out": false,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": false,
        "modules_to_save": null, "init_lora_weights": true
    });
    fs::write(peft.join("adapter_config.json"), config.to_string()).unwrap();
    let mut rng = Rng(4);
    let mut t: BTreeMap<String, OwnedTensor> = BTreeMap::new();
    for (m, o, i) in &MODULES[..2] {
        let (n, x) = tensor(
            &format!("base_model.model.{m}.lora_A.weight"),
            St::F32,
            &[4, *i],
            &rng.vec(4 * i, 0.3),
        );
        t.insert(n, x);
        let (n, x) = tensor(
            &format!("base_model.model.{m}.lora_B.weight"),
            St::F32,
            &[*o, 4],
            &rng.vec(o * 4, 0.3),
        );
        t.insert(n, x);
    }
    write_safetensors(peft.join("adapter_model.safetensors"), &t, &BTreeMap::new()).unwrap();
    // The same PEFT adapter twice: one stored A, B summed (rank kept).
    let twice = combine(
        &[AdapterInput::new(&peft, 0.5), AdapterInput::new(&peft, 0.5)],
        &p("twice.safetensors"),
        &CombineOptions::default(),
    )
    .unwrap();
    assert_eq!((twice.shared, twice.concatenated, twice.stored_a), (2, 0, 2));
    let ad = AdapterFile::open(p("twice.safetensors")).unwrap();
    for (m, o, _) in &MODULES[..2] {
        let key = format!("base_model.model.{m}.lora_B.weight");
        assert_eq!(ad.lora_b(m).unwrap().1, t[&key].data.as_slice(), "0.5 B + 0.5 B = B");
        assert_eq!(ad.lora_b(m).unwrap().0.shape, [*o, 4]);
    }
    // With a seed-plus-B adapter: concatenated, A stored.
    adapter(&p("v1.safetensors"), &Spec::new(5, 1));
    let mixed = combine(
        &[
            AdapterInput::new(p("v1.safetensors"), 1.0),
            AdapterInput::new(&peft, 2.0),
        ],
        &p("mixed.safetensors"),
        &CombineOptions::default(),
    )
    .unwrap();
    assert_eq!((mixed.shared, mixed.concatenated), (2, 2));
    let ad = AdapterFile::open(p("mixed.safetensors")).unwrap();
    assert_eq!(ad.config().seed, 5);
    assert_eq!(ad.config().module_rank(&ad.config().modules["layers.0.attn.q_proj"]), 8);
}

// --------------------------------------------------------------------------- refusals

fn refused(adapters: &[(&Path, f64)], out: &Path) -> String {
    let before = entries(out.parent().unwrap());
    let err = run(adapters, out).unwrap_err();
    assert_eq!(entries(out.parent().unwrap()), before, "nothing written: {err}");
    let message = err.to_string();
    assert!(!message.contains('\n'), "one line: {message}");
    message
}

#[test]
fn bad_inputs_are_refused_with_one_line_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let out = p("out.safetensors");
    adapter(&p("a.safetensors"), &Spec::new(5, 1));
    adapter(
        &p("full.safetensors"),
        &Spec {
            full: true,
            ..Spec::new(5, 2)
        },
    );
    let a = p("a.safetensors");
    let full = p("full.safetensors");

    let m = refused(&[], &out);
    assert!(m.contains("at least one adapter"), "{m}");
    let m = refused(&[(&a, f64::NAN)], &out);
    assert!(m.contains("weight must be a finite number"), "{m}");
    let m = refused(&[(&p("missing.safetensors"), 1.0)], &out);
    assert!(m.contains("does not exist"), "{m}");
    let err = run(&[(&a, 1.0)], &p("no-such-dir").join("out.safetensors")).unwrap_err();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err}"
    );
    assert!(err.to_string().contains("the directory"), "{err}");

    // Same module name, other d_in.
    let mut config =
        AdapterConfig::from_json(&AdapterFile::open(&a).unwrap().safetensors().metadata()["asymlora_config"]).unwrap();
    config.modules = BTreeMap::from([(
        "layers.0.attn.q_proj".to_string(),
        ModuleConfig::linear(24, 40, 0, false),
    )]);
    let (n, b) = tensor("layers.0.attn.q_proj.lora_B", St::F32, &[40, 4], &[0.5; 160]);
    write_adapter(p("narrow.safetensors"), &config, &BTreeMap::from([(n, b)])).unwrap();
    let m = refused(&[(&a, 1.0), (&p("narrow.safetensors"), 1.0)], &out);
    assert!(
        m.contains("module layers.0.attn.q_proj is 40 x 40") && m.contains("40 x 24"),
        "{m}"
    );
    assert!(matches!(
        run(&[(&a, 1.0), (&p("narrow.safetensors"), 1.0)], &out),
        Err(Error::Mismatch { .. })
    ));

    // Full tensors: not weighted, not summed.
    let m = refused(&[(&full, 0.5)], &out);
    assert!(m.contains("cannot be weighted"), "{m}");
    let m = refused(&[(&full, 1.0), (&full, 1.0)], &out);
    assert!(m.contains("cannot be summed"), "{m}");

    // NaN in a B.
    let mut tensors = BTreeMap::new();
    let (n, b) = tensor("layers.0.attn.q_proj.lora_B", St::F32, &[40, 4], &[f64::NAN; 160]);
    tensors.insert(n, b);
    config.modules.get_mut("layers.0.attn.q_proj").unwrap().d_in = 40;
    write_adapter(p("nan.safetensors"), &config, &tensors).unwrap();
    assert!(matches!(
        run(&[(&p("nan.safetensors"), 1.0)], &out),
        Err(Error::NonFinite { .. })
    ));

    // fan_in_fan_out must agree.
    config.base_model = Some(serde_json::json!({"fan_in_fan_out": true}));
    let (n, b) = tensor("layers.0.attn.q_proj.lora_B", St::F32, &[40, 4], &[0.5; 160]);
    write_adapter(p("t.safetensors"), &config, &BTreeMap::from([(n, b)])).unwrap();
    let m = refused(&[(&a, 1.0), (&p("t.safetensors"), 1.0)], &out);
    assert!(m.contains("fan_in_fan_out"), "{m}");

    // The output: never an input, replaced only with force.
    assert!(matches!(run(&[(&a, 1.0)], &a), Err(Error::Exists { .. })));
    fs::write(&out, b"old").unwrap();
    let m = refused(&[(&a, 1.0)], &out);
    assert!(m.contains("already exists"), "{m}");
    let force = CombineOptions {
        force: true,
        ..Default::default()
    };
    combine(&inputs(&[(&a, 1.0)]), &out, &force).unwrap();
    AdapterFile::open(&out).unwrap();
    let err = combine(&inputs(&[(&a, 1.0)]), &a, &force).unwrap_err().to_string();
    assert!(err.contains("is the input adapter"), "{err}");
}
