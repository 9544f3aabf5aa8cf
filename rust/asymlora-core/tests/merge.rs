//! The offline merge on real safetensors files: every merged value against the float64
//! reference rounded once, untouched tensors bit for bit, sharded directories mirrored,
//! weighted sums, unmerge, dtype changes, PEFT directories, thread-count determinism,
//! every refusal (with nothing written), atomicity and cancellation.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use asymlora_core::adapter::{write_adapter, AdapterConfig, AdapterFile, FactorA, ModuleConfig, OwnedTensor, Scaling};
use asymlora_core::io::SafetensorsFile;
use asymlora_core::merge::{merge, AdapterInput, MergeOptions, MergeReport, Observer, Silent, Totals};
use asymlora_core::{Dtype, Error};
use safetensors::Dtype as St;

mod common;

use common::{decode, raw, round_to, tensor, write, Rng};

// --------------------------------------------------------------------------- helpers

/// The modules of a tiny Llama-like model: (name, d_out, d_in).
const MODULES: [(&str, usize, usize); 4] = [
    ("model.layers.0.self_attn.q_proj", 40, 40),
    ("model.layers.0.self_attn.v_proj", 16, 40),
    ("model.layers.0.mlp.up_proj", 72, 40),
    ("model.layers.0.mlp.down_proj", 40, 72),
];

/// Base tensors (weights of MODULES plus untouched ones), in `dtype`.
fn base_tensors(dtype: St, seed: u64) -> Vec<(String, OwnedTensor)> {
    let mut rng = Rng(seed);
    let mut t = vec![tensor(
        "model.embed_tokens.weight",
        dtype,
        &[50, 40],
        &rng.vec(2000, 0.5),
    )];
    for (m, o, i) in MODULES {
        t.push(tensor(&format!("{m}.weight"), dtype, &[o, i], &rng.vec(o * i, 0.05)));
    }
    t.push(tensor("model.norm.weight", dtype, &[40], &vec![1.0; 40]));
    t.push(raw(
        "model.position_ids",
        St::I64,
        &[1, 3],
        (0..3i64).flat_map(|v| v.to_le_bytes()).collect(),
    ));
    t
}

fn module_config(d_in: usize, d_out: usize, stream: u64) -> ModuleConfig {
    ModuleConfig::linear(d_in, d_out, stream, false)
}

/// A seed-plus-B adapter on MODULES (rank 4, alpha 8; `up_proj` with rank 6 and its
/// own alpha; `down_proj` with a stored A), B in f32.
fn v1_adapter(path: &Path, seed: u64, b_scale: f64) {
    let mut rng = Rng(seed);
    let mut modules = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (k, (m, o, i)) in MODULES.iter().enumerate() {
        let mut mc = module_config(*i, *o, k as u64);
        if m.ends_with("up_proj") {
            mc.rank = Some(6);
            mc.alpha = Some(3.0);
        }
        if m.ends_with("down_proj") {
            mc.a_stored = true;
            let (name, t) = tensor(&format!("{m}.lora_A"), St::F32, &[4, *i], &rng.vec(4 * i, 0.2));
            tensors.insert(name, t);
        }
        let r = mc.rank.unwrap_or(4);
        let (name, t) = tensor(&format!("{m}.lora_B"), St::F32, &[*o, r], &rng.vec(o * r, b_scale));
        tensors.insert(name, t);
        modules.insert(m.to_string(), mc);
    }
    let config = AdapterConfig {
        rank: 4,
        alpha: 8.0,
        scaling: Scaling::AlphaOverR,
        seed: 77 + seed,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors: vec![],
        base_model: None,
    };
    write_adapter(path, &config, &tensors).unwrap();
}

/// `s * B @ A` of every module of a v1 adapter, in f64, by target tensor name.
fn v1_deltas(path: &Path) -> BTreeMap<String, Vec<f64>> {
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
        for i in 0..m.d_out {
            for j in 0..m.d_in {
                d[i * m.d_in + j] = s * (0..r).map(|q| b[i * r + q] * a[q * m.d_in + j]).sum::<f64>();
            }
        }
        out.insert(format!("{name}.weight"), d);
    }
    out
}

/// Every tensor of a checkpoint file or directory: name -> (dtype, shape, bytes).
fn read_all(path: &Path) -> BTreeMap<String, (St, Vec<usize>, Vec<u8>)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut f: Vec<_> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        f.sort();
        f
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let st = SafetensorsFile::open(&f).unwrap();
        let names: Vec<String> = st.tensor_names().map(str::to_string).collect();
        for n in names {
            let (info, bytes) = st.tensor(&n).unwrap();
            out.insert(n, (info.dtype, info.shape.clone(), bytes.to_vec()));
        }
    }
    out
}

/// Checks `out` = round(base + sum of `deltas` * weight) for every merged tensor (in
/// `out_dtype`, or the base dtype), and every other float tensor converted (or bit for
/// bit when the dtype is kept); returns the number of merged values checked.
fn check_merged(base: &Path, out: &Path, deltas: &[(BTreeMap<String, Vec<f64>>, f64)], out_dtype: Option<St>) -> usize {
    let (b, o) = (read_all(base), read_all(out));
    assert_eq!(
        b.keys().collect::<Vec<_>>(),
        o.keys().collect::<Vec<_>>(),
        "same tensor names"
    );
    let mut checked = 0;
    for (name, (bd, bshape, bbytes)) in &b {
        let (od, oshape, obytes) = &o[name];
        assert_eq!(bshape, oshape, "{name}");
        let is_float = matches!(bd, St::F16 | St::BF16 | St::F32 | St::F64);
        let want_dtype = if is_float { out_dtype.unwrap_or(*bd) } else { *bd };
        assert_eq!(*od, want_dtype, "{name}");
        let touched: Vec<(&Vec<f64>, f64)> = deltas
            .iter()
            .filter_map(|(d, w)| d.get(name).map(|v| (v, *w)))
            .collect();
        if touched.is_empty() {
            if *od == *bd {
                assert_eq!(bbytes, obytes, "{name} must be bit-identical");
            } else {
                assert_eq!(
                    decode(*od, obytes),
                    round_to(*od, &decode(*bd, bbytes)),
                    "{name} converted once"
                );
            }
            continue;
        }
        let mut exact = decode(*bd, bbytes);
        for (d, w) in touched {
            for (x, dv) in exact.iter_mut().zip(d) {
                *x += w * dv;
            }
        }
        let want = round_to(*od, &exact);
        let got = decode(*od, obytes);
        if *od == St::F64 {
            // No exact reference in f64 itself: both sides are f64 sums (different orders).
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-13, "{name}: {g} vs {w}");
            }
        } else {
            let differ = want
                .iter()
                .zip(&got)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{name}: {differ} of {} values differ from round(W + delta in f64)",
                want.len()
            );
        }
        checked += want.len();
    }
    checked
}

fn opts() -> MergeOptions {
    MergeOptions {
        fsync: false,
        ..Default::default()
    }
}

fn run(base: &Path, adapters: &[(&Path, f64)], out: &Path, o: &MergeOptions) -> Result<MergeReport, Error> {
    let inputs: Vec<AdapterInput> = adapters.iter().map(|(p, w)| AdapterInput::new(*p, *w)).collect();
    merge(base, &inputs, out, o, &mut Silent)
}

/// Entries of `dir` (names), to check that nothing (not even a temporary) is left.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A sharded model directory: two shards, the index, config.json and a tokenizer.
fn sharded_dir(dir: &Path, dtype: St) {
    fs::create_dir_all(dir).unwrap();
    let all = base_tensors(dtype, 1);
    let (first, second) = all.split_at(3);
    write(&dir.join("model-00001-of-00002.safetensors"), first.to_vec());
    write(&dir.join("model-00002-of-00002.safetensors"), second.to_vec());
    let mut map = serde_json::Map::new();
    for (n, _) in first {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _) in second {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    let total: usize = all.iter().map(|(_, t)| t.data.len()).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap() + "\n",
    )
    .unwrap();
    fs::write(
        dir.join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  \"torch_dtype\": \"bfloat16\"\n}\n",
    )
    .unwrap();
    fs::write(dir.join("tokenizer.json"), "{\"version\": \"1.0\"}").unwrap();
}

// --------------------------------------------------------------------------- results

#[test]
fn single_file_bf16_matches_the_float64_reference_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ad, out) = (
        dir.path().join("base.safetensors"),
        dir.path().join("a.safetensors"),
        dir.path().join("out.safetensors"),
    );
    write(&base, base_tensors(St::BF16, 1));
    v1_adapter(&ad, 1, 0.3);
    let report = run(&base, &[(&ad, 1.0)], &out, &opts()).unwrap();
    assert_eq!(report.merged, 4);
    assert_eq!(report.modules, 4);
    assert_eq!(report.unchanged, 3);
    let n = check_merged(&base, &out, &[(v1_deltas(&ad), 1.0)], None);
    assert_eq!(n as u64, report.merged_values);
    // Same layout: the header is copied, so only merged tensors' bytes differ.
    let (b, o) = (fs::read(&base).unwrap(), fs::read(&out).unwrap());
    assert_eq!(b.len(), o.len());
    let st = SafetensorsFile::open(&base).unwrap();
    let header = st.header_range();
    assert_eq!(b[header.clone()], o[header]);
    assert_eq!(SafetensorsFile::open(&out).unwrap().metadata(), st.metadata());
}

#[test]
fn cancelling_updates_still_round_exactly() {
    // Weights set to minus their update: the results are tiny and f32 accumulation alone
    // would be several ulps off; the guard recomputes those values in f64.
    let dir = tempfile::tempdir().unwrap();
    let (ad, base, out) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
        dir.path().join("o.safetensors"),
    );
    v1_adapter(&ad, 5, 0.3);
    let deltas = v1_deltas(&ad);
    let mut rng = Rng(9);
    let tensors: Vec<_> = MODULES
        .iter()
        .map(|(m, o, i)| {
            let d = &deltas[&format!("{m}.weight")];
            let w: Vec<f64> = d.iter().map(|x| -x * (1.0 + rng.next() * 1e-3)).collect();
            tensor(&format!("{m}.weight"), St::BF16, &[*o, *i], &w)
        })
        .collect();
    write(&base, tensors);
    let report = run(&base, &[(&ad, 1.0)], &out, &opts()).unwrap();
    check_merged(&base, &out, &[(deltas, 1.0)], None);
    assert!(report.recomputed > 0, "this data needs the f64 recomputation");
}

#[test]
fn sharded_directory_is_mirrored() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ad, out) = (
        dir.path().join("model"),
        dir.path().join("a.safetensors"),
        dir.path().join("merged"),
    );
    sharded_dir(&base, St::BF16);
    fs::write(base.join("pytorch_model.bin"), b"pickle").unwrap();
    fs::create_dir(base.join("original")).unwrap();
    v1_adapter(&ad, 2, 0.3);
    let report = run(&base, &[(&ad, 1.0)], &out, &opts()).unwrap();
    assert_eq!(
        entries(&out),
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    for same in ["config.json", "tokenizer.json", "model.safetensors.index.json"] {
        assert_eq!(
            fs::read(base.join(same)).unwrap(),
            fs::read(out.join(same)).unwrap(),
            "{same}"
        );
    }
    let skipped: Vec<&str> = report.skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(skipped, ["original/", "pytorch_model.bin"]);
    check_merged(&base, &out, &[(v1_deltas(&ad), 1.0)], None);
    // the shards hold the same tensors as before
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let a: Vec<String> = SafetensorsFile::open(base.join(shard))
            .unwrap()
            .tensor_names()
            .map(String::from)
            .collect();
        let b: Vec<String> = SafetensorsFile::open(out.join(shard))
            .unwrap()
            .tensor_names()
            .map(String::from)
            .collect();
        assert_eq!(a, b);
    }
    assert!(
        entries(dir.path()).iter().all(|e| !e.starts_with('.')),
        "no temporaries left"
    );
}

#[test]
fn weighted_sum_of_adapters_and_unmerge() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    write(&p("base.safetensors"), base_tensors(St::BF16, 3));
    v1_adapter(&p("a1.safetensors"), 3, 0.3);
    v1_adapter(&p("a2.safetensors"), 4, 0.2);
    let (d1, d2) = (v1_deltas(&p("a1.safetensors")), v1_deltas(&p("a2.safetensors")));
    run(
        &p("base.safetensors"),
        &[(&p("a1.safetensors"), 0.5), (&p("a2.safetensors"), -2.0)],
        &p("sum.safetensors"),
        &opts(),
    )
    .unwrap();
    check_merged(
        &p("base.safetensors"),
        &p("sum.safetensors"),
        &[(d1.clone(), 0.5), (d2, -2.0)],
        None,
    );

    let unmerge = MergeOptions {
        subtract: true,
        ..opts()
    };
    run(
        &p("base.safetensors"),
        &[(&p("a1.safetensors"), 0.5)],
        &p("un.safetensors"),
        &unmerge,
    )
    .unwrap();
    check_merged(&p("base.safetensors"), &p("un.safetensors"), &[(d1, -0.5)], None);
}

#[test]
fn same_bits_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // Large enough for many row tiles and column blocks, with ragged edges.
    let mut rng = Rng(11);
    let (o, i) = (203, 517);
    write(
        &p("base.safetensors"),
        vec![tensor("layer.proj.weight", St::BF16, &[o, i], &rng.vec(o * i, 0.05))],
    );
    let mut modules = BTreeMap::new();
    modules.insert("layer.proj".to_string(), module_config(i, o, 0));
    let config = AdapterConfig {
        rank: 16,
        alpha: 32.0,
        scaling: Scaling::AlphaOverSqrtR,
        seed: 5,
        generator: "haar-v1".into(),
        a_dtype: Dtype::BF16,
        a_gain: 1.0,
        modules,
        full_tensors: vec![],
        base_model: None,
    };
    let b = BTreeMap::from([tensor("layer.proj.lora_B", St::F32, &[o, 16], &rng.vec(o * 16, 0.1))]);
    write_adapter(p("a.safetensors"), &config, &b).unwrap();
    let mut outputs = vec![];
    for threads in [1, 2, 3, 8] {
        let out = p(&format!("out{threads}.safetensors"));
        let o = MergeOptions {
            threads: Some(threads),
            ..opts()
        };
        run(&p("base.safetensors"), &[(&p("a.safetensors"), 0.7)], &out, &o).unwrap();
        outputs.push(fs::read(&out).unwrap());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    check_merged(
        &p("base.safetensors"),
        &p("out1.safetensors"),
        &[(v1_deltas(&p("a.safetensors")), 0.7)],
        None,
    );
}

#[test]
fn dtype_changes_convert_every_float_tensor_and_update_index_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ad) = (dir.path().join("model"), dir.path().join("a.safetensors"));
    sharded_dir(&base, St::BF16);
    v1_adapter(&ad, 6, 0.3);
    for (dtype, st) in [(Dtype::F32, St::F32), (Dtype::F16, St::F16)] {
        let out = dir.path().join(format!("out-{dtype}"));
        let o = MergeOptions {
            dtype: Some(dtype),
            ..opts()
        };
        let report = run(&base, &[(&ad, 1.0)], &out, &o).unwrap();
        assert_eq!(report.converted, 2, "embedding and norm");
        check_merged(&base, &out, &[(v1_deltas(&ad), 1.0)], Some(st));
        let config: serde_json::Value = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], dtype.name());
        assert_eq!(config["model_type"], "llama");
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
        let data: usize = read_all(&out).values().map(|(_, _, b)| b.len()).sum();
        assert_eq!(index["metadata"]["total_size"], data);
    }
}

#[test]
fn float32_float16_and_float64_bases() {
    for dtype in [St::F32, St::F16, St::F64] {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        write(&p("base.safetensors"), base_tensors(dtype, 8));
        v1_adapter(&p("a.safetensors"), 8, 0.3);
        run(
            &p("base.safetensors"),
            &[(&p("a.safetensors"), 1.5)],
            &p("o.safetensors"),
            &opts(),
        )
        .unwrap();
        check_merged(
            &p("base.safetensors"),
            &p("o.safetensors"),
            &[(v1_deltas(&p("a.safetensors")), 1.5)],
            None,
        );
    }
}

/// A PEFT LoRA directory for MODULES, factors in `dtype`, with PEFT's key prefix.
fn peft_dir(dir: &Path, config: serde_json::Value, transposed_base: bool, seed: u64) -> BTreeMap<String, Vec<f64>> {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut rng = Rng(seed);
    let mut tensors = vec![];
    let mut deltas = BTreeMap::new();
    let r_default = config["r"].as_u64().unwrap() as usize;
    let alpha = config["lora_alpha"].as_f64().unwrap();
    let rslora = config["use_rslora"].as_bool().unwrap_or(false);
    for (m, o, i) in MODULES {
        let (r, a_) = if m.ends_with("v_proj") {
            (2, 5.0)
        } else {
            (r_default, alpha)
        };
        let a = rng.vec(r * i, 0.3);
        let b = rng.vec(o * r, 0.3);
        tensors.push(tensor(
            &format!("base_model.model.{m}.lora_A.weight"),
            St::F32,
            &[r, i],
            &a,
        ));
        tensors.push(tensor(
            &format!("base_model.model.{m}.lora_B.weight"),
            St::BF16,
            &[o, r],
            &b,
        ));
        let b = round_to(St::BF16, &b);
        let a = round_to(St::F32, &a);
        let s = if rslora { a_ / (r as f64).sqrt() } else { a_ / r as f64 };
        let mut d = vec![0.0; o * i];
        for x in 0..o {
            for y in 0..i {
                let v = s * (0..r).map(|q| b[x * r + q] * a[q * i + y]).sum::<f64>();
                if transposed_base {
                    d[y * o + x] = v;
                } else {
                    d[x * i + y] = v;
                }
            }
        }
        deltas.insert(format!("{m}.weight"), d);
    }
    write(&dir.join("adapter_model.safetensors"), tensors);
    deltas
}

fn peft_config() -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "fan_in_fan_out": false,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 5}, "bias": "none",
        "use_dora": false, "modules_to_save": null, "init_lora_weights": true
    })
}

#[test]
fn peft_directories_with_patterns_rslora_and_fan_in_fan_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    write(&p("base.safetensors"), base_tensors(St::BF16, 12));
    let deltas = peft_dir(&p("peft"), peft_config(), false, 12);
    run(
        &p("base.safetensors"),
        &[(&p("peft"), 1.0)],
        &p("o.safetensors"),
        &opts(),
    )
    .unwrap();
    check_merged(
        &p("base.safetensors"),
        &p("o.safetensors"),
        &[(deltas.clone(), 1.0)],
        None,
    );
    // The weights file itself names the directory too.
    let file = p("peft").join("adapter_model.safetensors");
    run(&p("base.safetensors"), &[(&file, 1.0)], &p("o2.safetensors"), &opts()).unwrap();
    assert_eq!(
        fs::read(p("o.safetensors")).unwrap(),
        fs::read(p("o2.safetensors")).unwrap()
    );

    // fan_in_fan_out: the base stores every weight transposed (GPT-2's Conv1D).
    let mut rng = Rng(13);
    let transposed: Vec<_> = MODULES
        .iter()
        .map(|(m, o, i)| tensor(&format!("{m}.weight"), St::BF16, &[*i, *o], &rng.vec(o * i, 0.05)))
        .collect();
    write(&p("conv1d.safetensors"), transposed);
    let mut cfg = peft_config();
    cfg["fan_in_fan_out"] = true.into();
    let deltas_t = peft_dir(&p("peft-t"), cfg, true, 12);
    run(
        &p("conv1d.safetensors"),
        &[(&p("peft-t"), 1.0)],
        &p("o3.safetensors"),
        &opts(),
    )
    .unwrap();
    check_merged(&p("conv1d.safetensors"), &p("o3.safetensors"), &[(deltas_t, 1.0)], None);
}

#[test]
fn peft_modules_to_save_replace_base_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let mut base = base_tensors(St::BF16, 14);
    base.push(tensor("score.weight", St::BF16, &[3, 40], &Rng(1).vec(120, 1.0)));
    write(&p("base.safetensors"), base);
    let mut cfg = peft_config();
    cfg["modules_to_save"] = serde_json::json!(["score"]);
    let deltas = peft_dir(&p("peft"), cfg, false, 14);
    // add the trained head to the adapter file
    let st = SafetensorsFile::open(p("peft").join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = st
        .tensor_names()
        .map(|n| {
            let (i, b) = st.tensor(n).unwrap();
            raw(n, i.dtype, &i.shape, b.to_vec())
        })
        .collect();
    drop(st);
    let head = Rng(2).vec(120, 1.0);
    tensors.push(tensor("base_model.model.score.weight", St::F32, &[3, 40], &head));
    write(&p("peft").join("adapter_model.safetensors"), tensors);
    let report = run(
        &p("base.safetensors"),
        &[(&p("peft"), 1.0)],
        &p("o.safetensors"),
        &opts(),
    )
    .unwrap();
    assert_eq!(report.replaced, 1);
    let o = read_all(&p("o.safetensors"));
    let (d, _, bytes) = &o["score.weight"];
    assert_eq!(*d, St::BF16);
    assert_eq!(decode(St::BF16, bytes), round_to(St::BF16, &round_to(St::F32, &head)));
    let mut d2 = deltas;
    d2.insert("score.weight".into(), vec![]); // checked above
    let err = run(
        &p("base.safetensors"),
        &[(&p("peft"), 0.5)],
        &p("w.safetensors"),
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot be weighted"), "{err}");
    assert!(!p("w.safetensors").exists());
}

// --------------------------------------------------------------------------- refusals

/// Runs a merge that must fail, and checks that nothing at all was written.
fn refused(base: &Path, adapters: &[(&Path, f64)], o: &MergeOptions) -> Error {
    let parent = base.parent().unwrap();
    let before = entries(parent);
    let out = parent.join("refused-out");
    let err = run(base, adapters, &out, o).unwrap_err();
    assert!(!out.exists(), "nothing under the output name");
    assert_eq!(entries(parent), before, "no temporaries left");
    err
}

#[test]
fn mismatches_are_listed_with_a_prefix_hint() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // The base lacks the "model." prefix the adapter uses.
    let renamed: Vec<_> = base_tensors(St::BF16, 1)
        .into_iter()
        .map(|(n, t)| (n.strip_prefix("model.").unwrap_or(&n).to_string(), t))
        .collect();
    write(&p("base.safetensors"), renamed);
    v1_adapter(&p("a.safetensors"), 1, 0.3);
    let err = refused(&p("base.safetensors"), &[(&p("a.safetensors"), 1.0)], &opts());
    assert!(matches!(err, Error::Mismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with("4 problem(s)"), "{text}");
    assert!(
        text.contains("module model.layers.0.self_attn.q_proj has no weight"),
        "{text}"
    );
    assert!(text.contains("--prefix-map 'model.='"), "{text}");
    // ... and the suggested map works
    let mapped = MergeOptions {
        prefix_map: vec![("model.".into(), String::new())],
        ..opts()
    };
    run(
        &p("base.safetensors"),
        &[(&p("a.safetensors"), 1.0)],
        &p("o.safetensors"),
        &mapped,
    )
    .unwrap();
}

#[test]
fn shape_and_dtype_mismatches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let mut t = base_tensors(St::BF16, 1);
    t[1] = tensor(
        "model.layers.0.self_attn.q_proj.weight",
        St::BF16,
        &[40, 41],
        &vec![0.0; 40 * 41],
    );
    t[2] = raw(
        "model.layers.0.self_attn.v_proj.weight",
        St::I8,
        &[16, 40],
        vec![0; 640],
    );
    write(&p("base.safetensors"), t);
    v1_adapter(&p("a.safetensors"), 1, 0.3);
    let text = refused(&p("base.safetensors"), &[(&p("a.safetensors"), 1.0)], &opts()).to_string();
    assert!(text.contains("2 problem(s)"), "{text}");
    assert!(text.contains("has shape [40, 41]"), "{text}");
    assert!(text.contains("has dtype I8") && text.contains("quantised"), "{text}");
}

#[test]
fn nonfinite_adapters_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    write(&p("base.safetensors"), base_tensors(St::BF16, 1));
    let mut modules = BTreeMap::new();
    modules.insert("model.layers.0.self_attn.q_proj".to_string(), module_config(40, 40, 0));
    let config = AdapterConfig {
        rank: 2,
        alpha: 2.0,
        scaling: Scaling::AlphaOverR,
        seed: 1,
        generator: "haar-v1".into(),
        a_dtype: Dtype::F32,
        a_gain: 1.0,
        modules,
        full_tensors: vec![],
        base_model: None,
    };
    let mut b = vec![0.1; 80];
    b[3] = f64::NAN;
    b[7] = f64::INFINITY;
    let tensors = BTreeMap::from([tensor("model.layers.0.self_attn.q_proj.lora_B", St::F32, &[40, 2], &b)]);
    write_adapter(p("nan.safetensors"), &config, &tensors).unwrap();
    let err = refused(&p("base.safetensors"), &[(&p("nan.safetensors"), 1.0)], &opts());
    assert!(matches!(err, Error::NonFinite { .. }), "{err:?}");
    assert!(err.to_string().contains("holds 2 NaN or infinite"), "{err}");
    let allow = MergeOptions {
        allow_nonfinite: true,
        ..opts()
    };
    let report = run(
        &p("base.safetensors"),
        &[(&p("nan.safetensors"), 1.0)],
        &p("o.safetensors"),
        &allow,
    )
    .unwrap();
    assert_eq!(report.nonfinite, 80, "rows 1 and 3 of q_proj (40 values each)");
}

#[test]
fn overflow_fails_mid_write_and_leaves_nothing() {
    // f16 base, an update far beyond f16's range: found only while writing the
    // second tensor, after the first was written; the temporary is removed.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let base = dir.path().join("model");
    sharded_dir(&base, St::F16);
    v1_adapter(&p("a.safetensors"), 1, 1e6);
    let err = refused(&base, &[(&p("a.safetensors"), 1.0)], &opts());
    assert!(matches!(err, Error::NonFinite { .. }), "{err:?}");
    assert!(err.to_string().contains("overflows"), "{err}");
}

#[test]
fn corrupt_truncated_and_unknown_dtype_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    v1_adapter(&p("a.safetensors"), 1, 0.3);
    write(&p("good.safetensors"), base_tensors(St::BF16, 1));
    let good = fs::read(p("good.safetensors")).unwrap();
    fs::write(p("truncated.safetensors"), &good[..good.len() - 10]).unwrap();
    fs::write(p("garbage.safetensors"), b"not a safetensors file at all").unwrap();
    let header = br#"{"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}}"#;
    let mut unknown = (header.len() as u64).to_le_bytes().to_vec();
    unknown.extend_from_slice(header);
    unknown.extend_from_slice(&[0, 0]);
    fs::write(p("unknown.safetensors"), unknown).unwrap();
    for bad in ["truncated", "garbage", "unknown"] {
        let err = refused(
            &p(&format!("{bad}.safetensors")),
            &[(&p("a.safetensors"), 1.0)],
            &opts(),
        );
        assert!(matches!(err, Error::Safetensors { .. }), "{bad}: {err:?}");
        assert!(err.to_string().contains(&format!("{bad}.safetensors")), "{err}");
    }
    // a corrupt adapter
    let err = refused(&p("good.safetensors"), &[(&p("garbage.safetensors"), 1.0)], &opts());
    assert!(matches!(err, Error::AdapterFormat { .. }), "{err:?}");
}

#[test]
fn unsupported_peft_adapters_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    write(&p("base.safetensors"), base_tensors(St::BF16, 1));
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("dora", serde_json::json!({"use_dora": true}), "DoRA"),
        ("bias", serde_json::json!({"bias": "all"}), "trains biases"),
        ("ia3", serde_json::json!({"peft_type": "IA3"}), "only LoRA adapters"),
        ("qalora", serde_json::json!({"use_qalora": true}), "QA-LoRA"),
    ];
    for (name, patch, needle) in cases {
        let mut cfg = peft_config();
        for (k, v) in patch.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        peft_dir(&p(name), cfg, false, 1);
        let err = refused(&p("base.safetensors"), &[(&p(name), 1.0)], &opts());
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
    // a pickle only: never opened
    fs::create_dir(p("pickle")).unwrap();
    fs::write(p("pickle").join("adapter_config.json"), peft_config().to_string()).unwrap();
    fs::write(p("pickle").join("adapter_model.bin"), b"\x80\x04 pickle").unwrap();
    let err = refused(&p("base.safetensors"), &[(&p("pickle"), 1.0)], &opts());
    assert!(err.to_string().contains("pickle"), "{err}");
    // quantised factors, DoRA magnitude vectors, an embedding LoRA without its B
    for (name, key, dtype, needle) in [
        (
            "int8",
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            St::I8,
            "quantised",
        ),
        (
            "mag",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
            St::F32,
            "DoRA",
        ),
        (
            "emb",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            St::F32,
            "lora_embedding_B is missing",
        ),
    ] {
        peft_dir(&p(name), peft_config(), false, 1);
        let file = p(name).join("adapter_model.safetensors");
        let st = SafetensorsFile::open(&file).unwrap();
        let mut tensors: Vec<(String, OwnedTensor)> = st
            .tensor_names()
            .filter(|n| *n != key)
            .map(|n| {
                let (i, b) = st.tensor(n).unwrap();
                raw(n, i.dtype, &i.shape, b.to_vec())
            })
            .collect();
        drop(st);
        let size = dtype.bitsize() / 8;
        tensors.push(raw(key, dtype, &[4, 40], vec![0; 160 * size]));
        write(&file, tensors);
        let err = refused(&p("base.safetensors"), &[(&p(name), 1.0)], &opts());
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
}

#[test]
fn outputs_are_protected() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let base = p("model");
    sharded_dir(&base, St::BF16);
    v1_adapter(&p("a.safetensors"), 1, 0.3);
    let ad = p("a.safetensors");
    let exists = |r: Result<MergeReport, Error>| matches!(r, Err(Error::Exists { .. }));
    assert!(exists(run(&base, &[(&ad, 1.0)], &base, &opts())), "the base itself");
    assert!(
        exists(run(&base, &[(&ad, 1.0)], &base.join("sub"), &opts())),
        "inside the base"
    );
    let force = MergeOptions { force: true, ..opts() };
    assert!(
        exists(run(&base, &[(&ad, 1.0)], dir.path(), &force)),
        "a directory holding the base"
    );
    fs::create_dir(p("taken")).unwrap();
    fs::write(p("taken").join("notes.txt"), b"mine").unwrap();
    assert!(
        exists(run(&base, &[(&ad, 1.0)], &p("taken"), &opts())),
        "exists, no force"
    );
    assert!(
        exists(run(&base, &[(&ad, 1.0)], &p("taken"), &force)),
        "not a model: not replaced even with force"
    );
    assert_eq!(fs::read(p("taken").join("notes.txt")).unwrap(), b"mine");

    // force replaces an earlier merge output
    run(&base, &[(&ad, 1.0)], &p("merged"), &opts()).unwrap();
    let first = fs::read(p("merged").join("model-00001-of-00002.safetensors")).unwrap();
    assert!(exists(run(&base, &[(&ad, 2.0)], &p("merged"), &opts())));
    run(&base, &[(&ad, 2.0)], &p("merged"), &force).unwrap();
    assert_ne!(
        fs::read(p("merged").join("model-00001-of-00002.safetensors")).unwrap(),
        first
    );
    check_merged(&base, &p("merged"), &[(v1_deltas(&ad), 2.0)], None);
    assert!(
        entries(dir.path()).iter().all(|e| !e.starts_with('.')),
        "{:?}",
        entries(dir.path())
    );
}

#[test]
fn inconsistent_shard_indexes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("model");
    sharded_dir(&base, St::BF16);
    v1_adapter(&dir.path().join("a.safetensors"), 1, 0.3);
    let index_path = base.join("model.safetensors.index.json");
    let good = fs::read_to_string(&index_path).unwrap();
    let swapped = good.replace(
        "\"model.norm.weight\": \"model-00002-of-00002.safetensors\"",
        "\"model.norm.weight\": \"model-00001-of-00002.safetensors\"",
    );
    assert_ne!(swapped, good);
    fs::write(&index_path, swapped).unwrap();
    let err = refused(&base, &[(&dir.path().join("a.safetensors"), 1.0)], &opts());
    assert!(
        err.to_string().contains("model.norm.weight is listed in model-00001"),
        "{err}"
    );
    fs::write(
        &index_path,
        good.replace("model-00002-of-00002.safetensors", "missing.safetensors"),
    )
    .unwrap();
    let err = refused(&base, &[(&dir.path().join("a.safetensors"), 1.0)], &opts());
    assert!(
        err.to_string().contains("missing.safetensors, which is missing"),
        "{err}"
    );
}

/// Cancels after `after` progress reports.
struct CancelAfter {
    after: usize,
    seen: usize,
    started: bool,
}

impl Observer for CancelAfter {
    fn start(&mut self, _: &Totals) {
        self.started = true;
    }
    fn advance(&mut self, _: u64, _: usize) {
        self.seen += 1;
    }
    fn cancelled(&mut self) -> bool {
        self.seen >= self.after
    }
}

#[test]
fn cancelling_mid_merge_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("model");
    sharded_dir(&base, St::BF16);
    v1_adapter(&dir.path().join("a.safetensors"), 1, 0.3);
    let before = entries(dir.path());
    let out = dir.path().join("out");
    let inputs = [AdapterInput::new(dir.path().join("a.safetensors"), 1.0)];
    for after in [1, 3, 6] {
        let mut obs = CancelAfter {
            after,
            seen: 0,
            started: false,
        };
        let err = merge(&base, &inputs, &out, &opts(), &mut obs).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err:?}");
        assert!(obs.started && obs.seen >= after);
        assert!(!out.exists());
        assert_eq!(entries(dir.path()), before);
    }
}
