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

use rayon::prelude::*;

/// Number of independent partial sums in [`dot`]; part of the generator's definition.
pub const DOT_LANES: usize = 8;

/// Below this many multiply-adds per reflector, columns are updated sequentially:
/// spawning rayon tasks would cost more than the work (results are identical).
const PARALLEL_MIN_WORK: usize = 1 << 16;

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
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// `y <- y - w * v`, element by element (a product, then a difference: no FMA).
#[inline]
fn sub_scaled(y: &mut [f64], w: f64, v: &[f64]) {
    for (yi, vi) in y.iter_mut().zip(v) {
        *yi -= w * vi;
    }
}

/// Applies `H = I - tau v v^T` to rows `k..` of each column in `cols`.
fn reflect_columns(cols: &mut [f64], d: usize, k: usize, v: &[f64], tau: f64) {
    let reflect = |col: &mut [f64]| {
        let y = &mut col[k..];
        let w = tau * dot(v, y);
        sub_scaled(y, w, v);
    };
    let ncols = cols.len() / d;
    if ncols > 1 && ncols * (d - k) >= PARALLEL_MIN_WORK {
        cols.par_chunks_mut(d).for_each(reflect);
    } else {
        cols.chunks_mut(d).for_each(reflect);
    }
}

/// One Householder reflector, stored in place of the column it annihilates.
struct Reflector {
    tau: f64,
    /// The diagonal entry `R_kk` (its sign decides the Haar sign fix).
    r_diag: f64,
}

/// Turns `x` (rows `k..` of column `k`) into the reflector vector `v = x - alpha e1`
/// with `alpha = -sign(x[0]) ||x||` (sign(0) = +1), and returns `tau = 2 / v.v`.
fn make_reflector(x: &mut [f64]) -> Reflector {
    let norm = dot(x, x).sqrt();
    let alpha = if x[0] >= 0.0 { -norm } else { norm };
    if norm == 0.0 {
        // A zero column (probability zero for Gaussian input): no reflection, R_kk = 0.
        return Reflector { tau: 0.0, r_diag: 0.0 };
    }
    x[0] -= alpha;
    let tau = 2.0 / dot(x, x);
    Reflector { tau, r_diag: alpha }
}

/// The `Q` of the thin QR of the `d x r` matrix in `data` (column-major, see module
/// docs), with column `k` of `Q` negated where `R_kk < 0`, in the same layout. The
/// result has orthonormal columns and, for Gaussian input, is Haar distributed.
/// `data` is overwritten by the reflectors.
///
/// Requires `1 <= r <= d` and `data.len() == r * d` (checked by the caller).
pub fn haar_q(data: &mut [f64], d: usize, r: usize) -> Vec<f64> {
    debug_assert!(r >= 1 && r <= d && data.len() == r * d);
    let mut reflectors = Vec::with_capacity(r);
    for k in 0..r {
        let (done, rest) = data.split_at_mut((k + 1) * d);
        let v = &mut done[k * d + k..];
        let h = make_reflector(v);
        reflect_columns(rest, d, k, v, h.tau);
        reflectors.push(h);
    }
    accumulate_q(data, d, r, &reflectors)
}

/// Builds `Q = H_0 H_1 ... H_{r-1} [I_r; 0]` by applying the reflectors backwards
/// to the first `r` unit vectors, then applies the sign fix.
fn accumulate_q(v_store: &[f64], d: usize, r: usize, reflectors: &[Reflector]) -> Vec<f64> {
    let mut q = vec![0.0f64; r * d];
    for j in 0..r {
        q[j * d + j] = 1.0;
    }
    for (k, h) in reflectors.iter().enumerate().rev() {
        let v = &v_store[k * d + k..(k + 1) * d];
        // Columns j < k are still e_j and are zero in rows k.., so H_k leaves them alone.
        reflect_columns(&mut q[k * d..], d, k, v, h.tau);
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
