//! Times regenerating every A of a Llama-2-7B-shaped adapter (r = 16):
//! `cargo run --release --example llama7b_regen -p asymlora-core [threads]`.

use std::time::Instant;

use asymlora_core::{random_orthogonal_many, Dtype, OrthogonalSpec};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let mut specs = Vec::new();
    for layer in 0..32u64 {
        for (i, d_in) in [4096, 4096, 4096, 4096, 4096, 4096, 11008].into_iter().enumerate() {
            specs.push(OrthogonalSpec::new(16, d_in, 0, layer * 7 + i as u64));
        }
    }
    for _ in 0..5 {
        let t = Instant::now();
        let out = pool.install(|| random_orthogonal_many(&specs, Dtype::F32)).unwrap();
        println!("{} matrices in {:.3} s", out.len(), t.elapsed().as_secs_f64());
    }
    if std::env::var_os("SPLIT").is_some() {
        let t = Instant::now();
        pool.install(|| {
            for s in &specs {
                std::hint::black_box(asymlora_core::orthogonal::gaussian_matrix(
                    s.rank, s.d_in, s.seed, s.stream,
                ));
            }
        });
        println!("gaussian only: {:.3} s", t.elapsed().as_secs_f64());
    }
}
