//! The reflector arithmetic of [`super`] in AVX2 intrinsics, bit for bit the same as
//! the portable code.
//!
//! Written by hand because the compiler does not vectorize the portable code this
//! way: it will not reorder the floating-point sums of `dot` (rightly: that would
//! change the bits), so it keeps eight scalar chains, and it does not share the loads
//! of `v` between columns. Here the eight lanes of the documented dot product are
//! exactly the lanes of two 256-bit registers (lanes 0-3 and 4-7): element `t` of a
//! slice is still added to lane `t mod 8` in order of increasing `t`, the tail goes
//! to lanes `0..` in scalar code, and the lanes combine through the same
//! [`super::combine_lanes`]. Products and sums are separate instructions
//! (`_mm256_mul_pd`, then `_mm256_add_pd` / `_mm256_sub_pd`, each rounded to nearest):
//! no FMA (only `avx2` is enabled, not `fma`, and LLVM never fuses these without
//! fast-math flags). Up to [`GROUP`] columns are swept together so that one load of
//! each reflector serves all of them, and each swept element is loaded once for its
//! update and the next dot product; each column's arithmetic is unchanged by that.

use std::arch::x86_64::*;

use super::{combine_lanes, Next, DOT_LANES, GROUP};

const _: () = assert!(GROUP == 4, "sweep dispatches 1 to 4 columns");

/// `dot(a, b)`, as [`super::dot`].
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    dots::<1>(a, [b.as_ptr()])[0]
}

/// The dot products of `v` with the `N` slices of length `v.len()` starting at `ys`
/// (`N = 1` today: the sweeps compute the others on the fly).
///
/// # Safety
/// AVX2; each `ys[c]` points to `v.len()` readable values.
#[target_feature(enable = "avx2")]
unsafe fn dots<const N: usize>(v: &[f64], ys: [*const f64; N]) -> [f64; N] {
    let n = v.len();
    let full = n - n % DOT_LANES;
    let vp = v.as_ptr();
    let mut lo = [_mm256_setzero_pd(); N];
    let mut hi = [_mm256_setzero_pd(); N];
    let mut t = 0;
    while t < full {
        let vlo = _mm256_loadu_pd(vp.add(t));
        let vhi = _mm256_loadu_pd(vp.add(t + 4));
        for c in 0..N {
            let ylo = _mm256_loadu_pd(ys[c].add(t));
            let yhi = _mm256_loadu_pd(ys[c].add(t + 4));
            lo[c] = _mm256_add_pd(lo[c], _mm256_mul_pd(vlo, ylo));
            hi[c] = _mm256_add_pd(hi[c], _mm256_mul_pd(vhi, yhi));
        }
        t += DOT_LANES;
    }
    let mut out = [0.0f64; N];
    for c in 0..N {
        let mut lanes = [0.0f64; DOT_LANES];
        _mm256_storeu_pd(lanes.as_mut_ptr(), lo[c]);
        _mm256_storeu_pd(lanes.as_mut_ptr().add(4), hi[c]);
        for (lane, i) in lanes.iter_mut().zip(full..n) {
            *lane += v[i] * *ys[c].add(i);
        }
        out[c] = combine_lanes(&lanes);
    }
    out
}

/// `ys[c][t] -= ws[c] * v[t]` for every column `c` and `t < v.len()`.
///
/// # Safety
/// AVX2; each `ys[c]` points to `v.len()` writable values, disjoint from each other
/// and from `v`.
#[target_feature(enable = "avx2")]
unsafe fn sub_scaled<const N: usize>(v: &[f64], ys: [*mut f64; N], ws: [f64; N]) {
    let n = v.len();
    let full = n - n % 4;
    let vp = v.as_ptr();
    let wv = ws.map(|w| _mm256_set1_pd(w));
    let mut t = 0;
    while t < full {
        let vv = _mm256_loadu_pd(vp.add(t));
        for c in 0..N {
            let p = ys[c].add(t);
            _mm256_storeu_pd(p, _mm256_sub_pd(_mm256_loadu_pd(p), _mm256_mul_pd(wv[c], vv)));
        }
        t += 4;
    }
    for c in 0..N {
        for (i, vi) in v.iter().enumerate().skip(full) {
            *ys[c].add(i) -= ws[c] * vi;
        }
    }
}

/// [`super::QrKernel::sweep`] for up to [`GROUP`] columns.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sweep(
    group: &mut [f64],
    d: usize,
    k: usize,
    v: &[f64],
    ws: &[f64],
    next: Option<Next>,
) -> [f64; GROUP] {
    let n = group.len() / d;
    assert!(group.len() == n * d && (1..=GROUP).contains(&n) && ws.len() == n && v.len() == d - k);
    if let Some(next) = next {
        assert!(next.v.len() == d - next.start && next.start + 1 >= k);
    }
    match n {
        1 => sweep_n::<1>(group, d, k, v, ws, next),
        2 => sweep_n::<2>(group, d, k, v, ws, next),
        3 => sweep_n::<3>(group, d, k, v, ws, next),
        _ => sweep_n::<4>(group, d, k, v, ws, next),
    }
}

/// Rows `k..` of the `N` columns minus `ws[c] * v`, fused with the dot products of
/// the updated columns with `next.v` (lanes counted from `next.start`): a scalar
/// prologue for the rows before the first full 8-row chunk of those lanes, 8-row
/// chunks, a scalar tail.
///
/// # Safety
/// AVX2; checked by [`sweep`]: `group` holds `N` columns of length `d`, `v.len() ==
/// d - k`, `next.v.len() == d - next.start`, `next.start >= k - 1`.
#[target_feature(enable = "avx2")]
unsafe fn sweep_n<const N: usize>(
    group: &mut [f64],
    d: usize,
    k: usize,
    v: &[f64],
    ws: &[f64],
    next: Option<Next>,
) -> [f64; GROUP] {
    let base = group.as_mut_ptr();
    let ys: [*mut f64; N] = std::array::from_fn(|c| base.add(c * d));
    let w: [f64; N] = std::array::from_fn(|c| ws[c]);
    let mut out = [0.0f64; GROUP];
    let Some(Next { v: nv, start: s0 }) = next else {
        sub_scaled::<N>(v, ys.map(|p| p.add(k)), w);
        return out;
    };
    let mut lanes = [[0.0f64; DOT_LANES]; N];
    let body = (s0 + DOT_LANES).min(d);
    for t in k.min(s0)..body {
        for c in 0..N {
            let y = ys[c].add(t);
            if t >= k {
                *y -= w[c] * v[t - k];
            }
            if t >= s0 {
                lanes[c][t - s0] += nv[t - s0] * *y;
            }
        }
    }
    let mut lo: [__m256d; N] = std::array::from_fn(|c| _mm256_loadu_pd(lanes[c].as_ptr()));
    let mut hi: [__m256d; N] = std::array::from_fn(|c| _mm256_loadu_pd(lanes[c].as_ptr().add(4)));
    let wv = w.map(|x| _mm256_set1_pd(x));
    let (vp, np) = (v.as_ptr(), nv.as_ptr());
    let mut t = body;
    while t + DOT_LANES <= d {
        let (v0, v1) = (_mm256_loadu_pd(vp.add(t - k)), _mm256_loadu_pd(vp.add(t - k + 4)));
        let (n0, n1) = (_mm256_loadu_pd(np.add(t - s0)), _mm256_loadu_pd(np.add(t - s0 + 4)));
        for c in 0..N {
            let p = ys[c].add(t);
            let y0 = _mm256_sub_pd(_mm256_loadu_pd(p), _mm256_mul_pd(wv[c], v0));
            let y1 = _mm256_sub_pd(_mm256_loadu_pd(p.add(4)), _mm256_mul_pd(wv[c], v1));
            _mm256_storeu_pd(p, y0);
            _mm256_storeu_pd(p.add(4), y1);
            lo[c] = _mm256_add_pd(lo[c], _mm256_mul_pd(n0, y0));
            hi[c] = _mm256_add_pd(hi[c], _mm256_mul_pd(n1, y1));
        }
        t += DOT_LANES;
    }
    for c in 0..N {
        _mm256_storeu_pd(lanes[c].as_mut_ptr(), lo[c]);
        _mm256_storeu_pd(lanes[c].as_mut_ptr().add(4), hi[c]);
        for i in t..d {
            let y = ys[c].add(i);
            *y -= w[c] * v[i - k];
            lanes[c][(i - s0) % DOT_LANES] += nv[i - s0] * *y;
        }
        out[c] = combine_lanes(&lanes[c]);
    }
    out
}
