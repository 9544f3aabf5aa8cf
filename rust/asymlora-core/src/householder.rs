//! Thin Householder QR with a fixed order of every floating-point operation.
//!
//! Hand-written on purpose: LAPACK bindings and the Rust linear-algebra crates pick
//! kernels, block sizes and summation orders from the CPU at run time, so their bits
//! differ between machines. Here every sum has one order written in the source, no
//! operation is fused, and parallel work never crosses a reduction.
//!
//! Layout: a `d x r` matrix is stored column by column, `r` slices of length `d`
//! (column `j` is `data[j*d .. (j+1)*d]`). Columns of our `d_in x r` input are the
//! rows of the Gaussian matrix, so both reads and writes are contiguous.
//!
//! Two kernels compute the same operations: [`QrKernel::Portable`] (plain Rust, the
//! reference) and, on x86-64 CPUs with AVX2, [`QrKernel::Avx2`] (`householder/avx2.rs`),
//! chosen at run time by [`QrKernel::best`]. They give the same bits by construction
//! (each lane of the 8-lane dot product is one AVX2 lane, every product and sum is a
//! separate IEEE operation in the same order) and by test (`kernels_agree_to_the_bit`
//! here, `qr_kernels_give_the_f64_vectors` in tests/golden.rs).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Number of independent partial sums in [`dot`]; part of the generator's definition.
pub const DOT_LANES: usize = 8;

/// Below this many multiply-adds per reflector, columns are updated sequentially:
/// spawning rayon tasks would cost more than the work (results are identical).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Columns reflected together: they share the loads of the reflector `v`.
const GROUP: usize = 4;

/// An implementation of the reflector arithmetic. Every kernel gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QrKernel {
    /// Plain Rust for any target: the reference.
    Portable,
    /// x86-64 AVX2 intrinsics (multiplies and adds kept separate: no FMA).
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl QrKernel {
    /// The fastest kernel this CPU supports.
    pub fn best() -> QrKernel {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return QrKernel::Avx2;
        }
        QrKernel::Portable
    }

    /// Every kernel this CPU can run (for tests that compare them).
    pub fn available() -> Vec<QrKernel> {
        let mut all = vec![QrKernel::Portable];
        if QrKernel::best() != QrKernel::Portable {
            all.push(QrKernel::best());
        }
        all
    }

    fn dot(self, a: &[f64], b: &[f64]) -> f64 {
        match self {
            QrKernel::Portable => dot(a, b),
            // SAFETY: `Avx2` is only constructed where the CPU has AVX2 (`best`).
            #[cfg(target_arch = "x86_64")]
            QrKernel::Avx2 => unsafe { avx2::dot(a, b) },
        }
    }

    /// [`sweep_columns`] on one group of at most [`GROUP`] columns of length `d`;
    /// entry `c` of the result belongs to column `c` (0 without `next`).
    fn sweep(self, group: &mut [f64], d: usize, k: usize, v: &[f64], ws: &[f64], next: Option<Next>) -> [f64; GROUP] {
        match self {
            QrKernel::Portable => {
                let mut dots = [0.0; GROUP];
                for ((col, &w), out) in group.chunks_mut(d).zip(ws).zip(&mut dots) {
                    sub_scaled(&mut col[k..], w, v);
                    if let Some(n) = next {
                        *out = dot(n.v, &col[n.start..]);
                    }
                }
                dots
            }
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            QrKernel::Avx2 => unsafe { avx2::sweep(group, d, k, v, ws, next) },
        }
    }
}

/// The reflector whose dot products a sweep computes as it goes: `v` (rows
/// `start..` of its column) is the next reflector to apply to the swept columns.
#[derive(Clone, Copy)]
struct Next<'a> {
    v: &'a [f64],
    start: usize,
}

/// `sum_i a[i] * b[i]` with [`DOT_LANES`] partial sums: element `i` goes to lane
/// `i mod 8` (the tail of a short slice likewise), lanes combine as
/// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
#[inline]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f64; DOT_LANES];
    let mut ac = a.chunks_exact(DOT_LANES);
    let mut bc = b.chunks_exact(DOT_LANES);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..DOT_LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ac.remainder().iter().zip(bc.remainder()).enumerate() {
        lanes[l] += x * y;
    }
    combine_lanes(&lanes)
}

/// The documented combination of the partial sums of [`dot`].
#[inline(always)]
fn combine_lanes(lanes: &[f64; DOT_LANES]) -> f64 {
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// `y <- y - w * v`, element by element (a product, then a difference: no FMA).
#[inline]
fn sub_scaled(y: &mut [f64], w: f64, v: &[f64]) {
    for (yi, vi) in y.iter_mut().zip(v) {
        *yi -= w * vi;
    }
}

/// For each column `c` of `cols` (columns of length `d`): rows `k..` become
/// `y - ws[c] * v` (the second half of the specification's `apply`, with
/// `ws[c] = tau * dot(v, y)` computed before); then, if `next` is given, returns per
/// column `dot(next.v, rows next.start..)` of the updated column. One pass over
/// the columns instead of two, with each element's operations in the documented order.
fn sweep_columns(
    kernel: QrKernel,
    cols: &mut [f64],
    d: usize,
    k: usize,
    v: &[f64],
    ws: &[f64],
    next: Option<Next>,
) -> Vec<f64> {
    let ncols = cols.len() / d;
    debug_assert_eq!(ws.len(), ncols);
    let mut dots = vec![0.0f64; ncols];
    let run = |((g, w), out): ((&mut [f64], &[f64]), &mut [f64])| {
        out.copy_from_slice(&kernel.sweep(g, d, k, v, w, next)[..out.len()]);
    };
    if ncols > GROUP && ncols * (d - k) >= PARALLEL_MIN_WORK {
        let groups = cols.par_chunks_mut(GROUP * d).zip(ws.par_chunks(GROUP));
        groups.zip(dots.par_chunks_mut(GROUP)).for_each(run);
    } else {
        let groups = cols.chunks_mut(GROUP * d).zip(ws.chunks(GROUP));
        groups.zip(dots.chunks_mut(GROUP)).for_each(run);
    }
    dots
}

/// One Householder reflector, stored in place of the column it annihilates.
struct Reflector {
    tau: f64,
    /// The diagonal entry `R_kk` (its sign decides the Haar sign fix).
    r_diag: f64,
}

/// Turns `x` (rows `k..` of column `k`) into the reflector vector `v = x - alpha e1`
/// with `alpha = -sign(x[0]) ||x||` (sign(0) = +1), and returns `tau = 2 / v.v`.
fn make_reflector(kernel: QrKernel, x: &mut [f64]) -> Reflector {
    let norm = kernel.dot(x, x).sqrt();
    let alpha = if x[0] >= 0.0 { -norm } else { norm };
    if norm == 0.0 {
        // A zero column (probability zero for Gaussian input): no reflection, R_kk = 0.
        return Reflector { tau: 0.0, r_diag: 0.0 };
    }
    x[0] -= alpha;
    let tau = 2.0 / kernel.dot(x, x);
    Reflector { tau, r_diag: alpha }
}

/// The `Q` of the thin QR of the `d x r` matrix in `data` (column-major, see module
/// docs), with column `k` of `Q` negated where `R_kk < 0`, in the same layout. The
/// result has orthonormal columns and, for Gaussian input, is Haar distributed.
/// `data` is overwritten by the reflectors.
///
/// Requires `1 <= r <= d` and `data.len() == r * d` (checked by the caller).
pub fn haar_q(data: &mut [f64], d: usize, r: usize) -> Vec<f64> {
    haar_q_with(QrKernel::best(), data, d, r)
}

/// [`haar_q`] with a given kernel (the same bits with each).
///
/// The schedule differs from the specification's loop only in when independent
/// work happens: after reflector `k` is applied to column `k + 1` (which makes
/// reflector `k + 1`), applying reflector `k` to each later column and taking that
/// column's dot product with reflector `k + 1` share one pass.
pub fn haar_q_with(kernel: QrKernel, data: &mut [f64], d: usize, r: usize) -> Vec<f64> {
    debug_assert!(r >= 1 && r <= d && data.len() == r * d);
    let mut reflectors = Vec::with_capacity(r);
    let (first, later) = data.split_at_mut(d);
    let h = make_reflector(kernel, first);
    // ws[i]: tau_k * dot(v_k, column k + 1 + i), for the reflector k being applied.
    let mut ws: Vec<f64> = later.chunks(d).map(|y| h.tau * kernel.dot(first, y)).collect();
    reflectors.push(h);
    for k in 0..r - 1 {
        let (done, rest) = data.split_at_mut((k + 1) * d);
        let v = &done[k * d + k..];
        let (next_col, others) = rest.split_at_mut(d);
        kernel.sweep(next_col, d, k, v, &ws[..1], None);
        let x = &mut next_col[k + 1..];
        let h = make_reflector(kernel, x);
        let next = Next { v: x, start: k + 1 };
        let dots = sweep_columns(kernel, others, d, k, v, &ws[1..], Some(next));
        ws = dots.iter().map(|dt| h.tau * dt).collect();
        reflectors.push(h);
    }
    accumulate_q(kernel, data, d, r, &reflectors)
}

/// Builds `Q = H_0 H_1 ... H_{r-1} [I_r; 0]` by applying the reflectors backwards
/// to the first `r` unit vectors, then applies the sign fix. Columns `j < k` are
/// still `e_j` and zero in rows `k..` when `H_k` comes, so it skips them; applying
/// `H_k` to columns `k..` shares its pass with their dot products with `v_{k-1}`.
fn accumulate_q(kernel: QrKernel, v_store: &[f64], d: usize, r: usize, reflectors: &[Reflector]) -> Vec<f64> {
    let mut q = vec![0.0f64; r * d];
    for j in 0..r {
        q[j * d + j] = 1.0;
    }
    let v_of = |k: usize| &v_store[k * d + k..(k + 1) * d];
    let unit_dot = |q: &[f64], k: usize| reflectors[k].tau * kernel.dot(v_of(k), &q[k * d + k..(k + 1) * d]);
    // ws[i]: tau_k * dot(v_k, column k + i of Q), for the reflector k being applied.
    let mut ws = vec![unit_dot(&q, r - 1)];
    for k in (0..r).rev() {
        let next = (k > 0).then(|| Next {
            v: v_of(k - 1),
            start: k - 1,
        });
        let dots = sweep_columns(kernel, &mut q[k * d..], d, k, v_of(k), &ws, next);
        if k > 0 {
            let tau = reflectors[k - 1].tau;
            ws = std::iter::once(unit_dot(&q, k - 1))
                .chain(dots.iter().map(|dt| tau * dt))
                .collect();
        }
    }
    for (col, h) in q.chunks_mut(d).zip(reflectors) {
        if h.r_diag < 0.0 {
            col.iter_mut().for_each(|x| *x = -*x);
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram_error(q: &[f64], d: usize, r: usize) -> f64 {
        let mut worst = 0.0f64;
        for i in 0..r {
            for j in 0..r {
                let g = dot(&q[i * d..(i + 1) * d], &q[j * d..(j + 1) * d]);
                let target = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((g - target).abs());
            }
        }
        worst
    }

    /// Values spread over many binades (signs, magnitudes from 1e-6 to 1e6), so that
    /// any change of operation order shows in the low bits.
    fn spread_values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let unit = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                unit * 10f64.powi((s % 13) as i32 - 6)
            })
            .collect()
    }

    /// The specification's loop, literally: reflector `k` made, then applied
    /// (`apply`: a dot product, then the update) to each later column in turn.
    fn literal_haar_q(m: &mut [f64], d: usize, r: usize) -> Vec<f64> {
        let apply = |v: &[f64], tau: f64, y: &mut [f64]| {
            let w = tau * dot(v, y);
            sub_scaled(y, w, v);
        };
        let mut hs = Vec::new();
        for k in 0..r {
            let (done, rest) = m.split_at_mut((k + 1) * d);
            let h = make_reflector(QrKernel::Portable, &mut done[k * d + k..]);
            rest.chunks_mut(d)
                .for_each(|y| apply(&done[k * d + k..], h.tau, &mut y[k..]));
            hs.push(h);
        }
        let mut q = vec![0.0; r * d];
        (0..r).for_each(|j| q[j * d + j] = 1.0);
        for (k, h) in hs.iter().enumerate().rev() {
            let v = &m[k * d + k..(k + 1) * d];
            q[k * d..].chunks_mut(d).for_each(|y| apply(v, h.tau, &mut y[k..]));
        }
        for (col, h) in q.chunks_mut(d).zip(&hs) {
            if h.r_diag < 0.0 {
                col.iter_mut().for_each(|x| *x = -*x);
            }
        }
        q
    }

    #[test]
    fn kernels_agree_to_the_bit() {
        let kernels = QrKernel::available();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            assert!(kernels.contains(&QrKernel::Avx2));
        }
        for n in 0..70 {
            let (a, b) = (spread_values(n, 1), spread_values(n, 2));
            for &kernel in &kernels {
                assert_eq!(kernel.dot(&a, &b).to_bits(), dot(&a, &b).to_bits(), "{kernel:?} n={n}");
            }
        }
        for d in [
            1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 23, 31, 32, 33, 64, 100, 257, 1031,
        ] {
            for r in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17] {
                if r > d {
                    continue;
                }
                let input = spread_values(d * r, (d * 100 + r) as u64);
                let reference = literal_haar_q(&mut input.clone(), d, r);
                for &kernel in &kernels {
                    let got = haar_q_with(kernel, &mut input.clone(), d, r);
                    let same = got.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{kernel:?} d={d} r={r}");
                }
            }
        }
    }

    #[test]
    fn dot_order_is_the_documented_one() {
        let a: Vec<f64> = (0..11).map(|i| 1.0 + i as f64 * 1e-17).collect();
        let ones = vec![1.0; 11];
        let mut lanes = [0.0; 8];
        for (i, x) in a.iter().enumerate() {
            lanes[i % 8] += x;
        }
        let expected =
            ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        assert_eq!(dot(&a, &ones).to_bits(), expected.to_bits());
    }

    #[test]
    fn q_is_orthonormal_and_spans_the_input() {
        let (d, r) = (37, 5);
        let input: Vec<f64> = (0..d * r).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        let q = haar_q(&mut input.clone(), d, r);
        assert!(gram_error(&q, d, r) < 1e-14);
        // Q^T x_0 is (±||x_0||, 0, ...): the first column lies along Q's first column.
        let x0 = &input[..d];
        let proj: Vec<f64> = (0..r).map(|j| dot(&q[j * d..(j + 1) * d], x0)).collect();
        assert!(proj[0] > 0.0, "sign fix makes R_00 positive");
        assert!(proj[1..].iter().all(|p| p.abs() < 1e-12));
    }

    #[test]
    fn square_and_single_column_shapes() {
        for (d, r) in [(1, 1), (4, 4), (9, 1)] {
            let mut m: Vec<f64> = (0..d * r).map(|i| (i as f64 + 1.0).sin()).collect();
            let q = haar_q(&mut m, d, r);
            assert!(gram_error(&q, d, r) < 1e-14, "d={d} r={r}");
        }
    }

    #[test]
    fn zero_column_does_not_produce_nan() {
        let (d, r) = (4, 2);
        let mut m = vec![0.0; d * r];
        m[d + 1] = 3.0;
        let q = haar_q(&mut m, d, r);
        assert!(q.iter().all(|x| x.is_finite()));
    }
}
