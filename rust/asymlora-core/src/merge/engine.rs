//! The arithmetic of a merge, one tensor (or a band of its rows) at a time.
//!
//! A merged weight is `W' = W + L·R`: `L` (rows x K) and `R` (K x cols) stack the
//! low-rank factors of every adapter on that weight (K is the sum of their ranks), with
//! each adapter's weight and scale folded into `L`. Every output element is
//!
//! ```text
//! acc = 0;  for t in 0..K { acc += L[i,t] * R[t,j] }      (in order, in f32 or f64)
//! W'[i,j] = round_once(W[i,j] + acc)
//! ```
//!
//! The order of the operations is fixed in the source and is the same for every
//! element, whatever the thread count or the SIMD width (work is split over rows, and
//! vector lanes are different columns), and no fused multiply-add is ever used, so the
//! result is the same to the bit on every machine.
//!
//! Precision and rounding:
//!
//! * 16-bit outputs from 16- or 32-bit weights accumulate in f32. A per-element bound on
//!   the f32 error ([`Guard`]) tells whether `round(W + acc)` is provably the rounding of
//!   the exact value; the few elements where it is not (near a rounding boundary, or
//!   where `W` and the update cancel) are recomputed from the exact factors in f64. So
//!   every output is the exact `W + L·R` rounded once (up to f64's own error there).
//! * f32 and f64 outputs, and f64 weights, accumulate in f64; `W + acc` is rounded to
//!   odd (an error-free `TwoSum` gives the rounding error), which the one rounding to a
//!   narrower output dtype (nearest, ties to even) does not disturb.

use half::f16;
use rayon::prelude::*;
use safetensors::Dtype as StDtype;

use crate::dtype::{f32_round_to_odd, Dtype};

/// Floating-point dtypes a merge reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    F16,
    BF16,
    F32,
    F64,
}

impl Float {
    pub fn from_st(dtype: StDtype) -> Option<Float> {
        match dtype {
            StDtype::F16 => Some(Float::F16),
            StDtype::BF16 => Some(Float::BF16),
            StDtype::F32 => Some(Float::F32),
            StDtype::F64 => Some(Float::F64),
            _ => None,
        }
    }

    pub fn to_st(self) -> StDtype {
        match self {
            Float::F16 => StDtype::F16,
            Float::BF16 => StDtype::BF16,
            Float::F32 => StDtype::F32,
            Float::F64 => StDtype::F64,
        }
    }

    pub fn from_dtype(dtype: Dtype) -> Float {
        match dtype {
            Dtype::F32 => Float::F32,
            Dtype::F16 => Float::F16,
            Dtype::BF16 => Float::BF16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Float::F16 | Float::BF16 => 2,
            Float::F32 => 4,
            Float::F64 => 8,
        }
    }
}

/// The precision a weight of dtype `w` merged into dtype `out` accumulates in.
pub fn precision(w: Float, out: Float) -> Precision {
    match (w, out) {
        (Float::F64, _) | (_, Float::F32 | Float::F64) => Precision::F64,
        _ => Precision::F32,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// Values of a little-endian float tensor, widened exactly to f64.
pub fn decode_f64(kind: Float, bytes: &[u8]) -> Vec<f64> {
    crate::dtype::decode_float(kind.to_st(), bytes).expect("a float dtype")
}

/// How many values of a little-endian float tensor are NaN or infinite.
pub fn count_nonfinite(kind: Float, bytes: &[u8]) -> usize {
    match kind {
        Float::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
            .count(),
        Float::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
            .count(),
        Float::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .count(),
        Float::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                u64::from_le_bytes((*c).try_into().expect("chunks of 8")) & 0x7ff0_0000_0000_0000
                    == 0x7ff0_0000_0000_0000
            })
            .count(),
    }
}

/// One adapter's update of one weight: `coef * B·A`, or its transpose when the base
/// stores the weight as (d_in x d_out) (PEFT's `fan_in_fan_out`, GPT-2's `Conv1D`).
pub struct Term<'a> {
    /// weight x scale x (-1 when unmerging), applied once to each entry of `L`.
    pub coef: f64,
    /// `A`, r x d_in, row-major, exact values.
    pub a: &'a [f64],
    /// `B`, d_out x r, row-major, exact values.
    pub b: &'a [f64],
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub transposed: bool,
}

/// Lanes (adjacent columns) accumulated together in registers, per precision.
const LANES_F32: usize = 64;
const LANES_F64: usize = 16;

/// The stacked factors `L` (rows x k) and `R` (k x cols) of one weight. `R` is stored
/// packed by column chunks of `N`: `r[c * k + t]` holds `R[t, c*N .. c*N + N]`
/// (zeros past `cols`), so a chunk's `k` rows are contiguous.
pub struct LowRank<T, const N: usize> {
    pub cols: usize,
    pub k: usize,
    pub l: Vec<T>,
    pub r: Vec<[T; N]>,
}

impl<T: Copy + Default, const N: usize> LowRank<T, N> {
    fn new(rows: usize, cols: usize, k: usize, l: &[f64], r: &[f64], cast: impl Fn(f64) -> T) -> Self {
        let chunks = cols.div_ceil(N);
        let mut packed = vec![[T::default(); N]; chunks * k];
        for t in 0..k {
            for (j, &x) in r[t * cols..(t + 1) * cols].iter().enumerate() {
                packed[(j / N) * k + t][j % N] = cast(x);
            }
        }
        debug_assert_eq!(l.len(), rows * k);
        LowRank {
            cols,
            k,
            l: l.iter().map(|&x| cast(x)).collect(),
            r: packed,
        }
    }
}

pub enum Factors {
    /// f32 accumulation, with the bound and the exact factors that decide, element by
    /// element, whether the f32 result is certainly the correctly rounded one.
    F32(LowRank<f32, LANES_F32>, Guard),
    F64(LowRank<f64, LANES_F64>),
}

/// What the f32 path needs to know when its result might round differently from the
/// exact `W + L·R`, and to recompute those (rare) elements in f64.
///
/// The f32 accumulation error of an element is at most `(k + 3) u sum_t |L_it R_tj|`
/// (`u` = 2^-24: rounding `L`, the products and the sums); `bound[i] * rmax[j]` is a
/// generous upper bound of it, and the f32 sum `W + acc` adds at most half an f32 ulp.
/// Where that f32 value is farther than both from every rounding boundary (midpoint)
/// of the output dtype, the exact value rounds the same way; elsewhere the element is
/// recomputed from the exact factors in f64 and rounded once from there.
pub struct Guard {
    /// Per row: twice `(k + 3) * 2^-24 * 1.25 * sum_t |L_it|` (compared with twice the
    /// distance to a midpoint, see `tile_f32`).
    bound: Vec<f32>,
    /// Per column chunk: `max_t |R_tj|`, packed like `R`.
    rmax: Vec<[f32; LANES_F32]>,
    /// The exact `L` (rows x k, row-major) and `R` (column-major: `rt64[j * k + t]`)
    /// in f64, each element's `k` values contiguous.
    l64: Vec<f64>,
    rt64: Vec<f64>,
}

impl Factors {
    /// Stacks `terms` (in order) for a weight of `rows` x `cols`. Each entry of `L` is
    /// `coef * B[i,k]` (or `coef * A[k,i]` transposed) computed in f64 and rounded once
    /// to the accumulation precision; `R` holds `A` (or `B` transposed), rounded the same
    /// way (exact for factors stored in 16 or 32 bits).
    pub fn build(terms: &[Term<'_>], rows: usize, cols: usize, precision: Precision) -> Factors {
        let k: usize = terms.iter().map(|t| t.rank).sum();
        let mut l = vec![0f64; rows * k];
        let mut r = vec![0f64; k * cols];
        let mut k0 = 0;
        for t in terms {
            let (tr, tc) = if t.transposed {
                (t.d_in, t.d_out)
            } else {
                (t.d_out, t.d_in)
            };
            assert_eq!((tr, tc), (rows, cols), "term shape checked in the plan");
            for i in 0..rows {
                for q in 0..t.rank {
                    let v = if t.transposed {
                        t.a[q * t.d_in + i]
                    } else {
                        t.b[i * t.rank + q]
                    };
                    l[i * k + k0 + q] = t.coef * v;
                }
            }
            for q in 0..t.rank {
                let row = &mut r[(k0 + q) * cols..(k0 + q + 1) * cols];
                if t.transposed {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = t.b[j * t.rank + q];
                    }
                } else {
                    row.copy_from_slice(&t.a[q * t.d_in..(q + 1) * t.d_in]);
                }
            }
            k0 += t.rank;
        }
        match precision {
            Precision::F64 => Factors::F64(LowRank::new(rows, cols, k, &l, &r, |x| x)),
            Precision::F32 => {
                let f = LowRank::<f32, LANES_F32>::new(rows, cols, k, &l, &r, |x| x as f32);
                let factor = 2.0 * (k as f64 + 3.0) * 2f64.powi(-24) * 1.25;
                let bound =
                    f.l.chunks(k.max(1))
                        .map(|row| (row.iter().map(|x| f64::from(x.abs())).sum::<f64>() * factor) as f32)
                        .take(rows)
                        .collect::<Vec<f32>>();
                let bound = if k == 0 { vec![0.0; rows] } else { bound };
                let rmax =
                    f.r.chunks(k.max(1))
                        .map(|chunk| {
                            let mut m = [0f32; LANES_F32];
                            for row in chunk {
                                for (x, &v) in m.iter_mut().zip(row) {
                                    *x = x.max(v.abs());
                                }
                            }
                            m
                        })
                        .collect();
                let rmax = if k == 0 {
                    vec![[0f32; LANES_F32]; cols.div_ceil(LANES_F32)]
                } else {
                    rmax
                };
                Factors::F32(
                    f,
                    Guard {
                        bound,
                        rmax,
                        l64: l,
                        rt64: (0..cols)
                            .flat_map(|j| (0..k).map(move |t| (t, j)))
                            .map(|(t, j)| r[t * cols + j])
                            .collect(),
                    },
                )
            }
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Factors::F32(f, _) => f.cols,
            Factors::F64(f) => f.cols,
        }
    }
}

/// Rows per parallel task.
const TILE_ROWS: usize = 8;
/// Columns per block: `R[:, block]` stays in L1 across the rows of a tile.
const COL_BLOCK: usize = 256;

/// Test hook: use the portable kernel even where a wider one is available (the bits
/// are the same; tests check that). Only x86-64 has a wider kernel today.
#[cfg(target_arch = "x86_64")]
static PORTABLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Counts from merging rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowStats {
    /// Outputs that are NaN or infinite where `W` was finite (overflow).
    pub nonfinite: u64,
    /// Outputs the f32 path could not prove correctly rounded, recomputed in f64.
    pub recomputed: u64,
}

impl std::ops::Add for RowStats {
    type Output = RowStats;
    fn add(self, o: RowStats) -> RowStats {
        RowStats {
            nonfinite: self.nonfinite + o.nonfinite,
            recomputed: self.recomputed + o.recomputed,
        }
    }
}

impl std::iter::Sum for RowStats {
    fn sum<I: Iterator<Item = RowStats>>(iter: I) -> RowStats {
        iter.fold(RowStats::default(), |a, b| a + b)
    }
}

impl std::ops::AddAssign for RowStats {
    fn add_assign(&mut self, o: RowStats) {
        *self = *self + o;
    }
}

/// Computes rows `row0..row0 + n` of `W + L·R` from the bytes `w` of those rows (dtype
/// `w_kind`) into `out` (dtype `out_kind`), in parallel over row tiles on the current
/// rayon pool.
pub fn merge_rows(
    w: &[u8],
    w_kind: Float,
    out: &mut [u8],
    out_kind: Float,
    factors: &Factors,
    row0: usize,
) -> RowStats {
    let cols = factors.cols();
    if cols == 0 {
        return RowStats::default();
    }
    let (wrow, orow) = (cols * w_kind.size(), cols * out_kind.size());
    debug_assert_eq!(w.len() / wrow, out.len() / orow);
    out.par_chunks_mut(TILE_ROWS * orow)
        .zip(w.par_chunks(TILE_ROWS * wrow))
        .enumerate()
        .map(|(tile, (o, wt))| tile_dispatch(wt, w_kind, o, out_kind, factors, row0 + tile * TILE_ROWS))
        .sum()
}

fn tile_dispatch(w: &[u8], wk: Float, out: &mut [u8], ok: Float, f: &Factors, row0: usize) -> RowStats {
    #[cfg(target_arch = "x86_64")]
    {
        if !PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed) && std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { tile_avx2(w, wk, out, ok, f, row0) };
        }
    }
    tile(w, wk, out, ok, f, row0)
}

/// The same code compiled with AVX2 enabled: wider vectors, the same operations in
/// the same order per element (no FMA: Rust never fuses a multiply and an add).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(w: &[u8], wk: Float, out: &mut [u8], ok: Float, f: &Factors, row0: usize) -> RowStats {
    tile(w, wk, out, ok, f, row0)
}

/// Picks the monomorphic kernel for (weight dtype, output dtype).
#[inline(always)]
fn tile(w: &[u8], wk: Float, out: &mut [u8], ok: Float, f: &Factors, row0: usize) -> RowStats {
    use Float::*;
    let sizes = (wk.size(), ok.size());
    match (f, wk, ok) {
        (Factors::F32(f, g), BF16, BF16) => tile_f32(w, out, sizes, f, g, row0, dec_bf16_f32, Bf16Out),
        (Factors::F32(f, g), BF16, F16) => tile_f32(w, out, sizes, f, g, row0, dec_bf16_f32, F16Out),
        (Factors::F32(f, g), F16, F16) => tile_f32(w, out, sizes, f, g, row0, dec_f16_f32, F16Out),
        (Factors::F32(f, g), F16, BF16) => tile_f32(w, out, sizes, f, g, row0, dec_f16_f32, Bf16Out),
        (Factors::F32(f, g), F32, BF16) => tile_f32(w, out, sizes, f, g, row0, dec_f32_f32, Bf16Out),
        (Factors::F32(f, g), F32, F16) => tile_f32(w, out, sizes, f, g, row0, dec_f32_f32, F16Out),
        (Factors::F64(f), F64, _) => tile_f64_out(w, out, sizes, f, row0, dec_f64_f64, ok),
        (Factors::F64(f), F32, _) => tile_f64_out(w, out, sizes, f, row0, dec_f32_f64, ok),
        (Factors::F64(f), BF16, _) => tile_f64_out(w, out, sizes, f, row0, dec_bf16_f64, ok),
        (Factors::F64(f), F16, _) => tile_f64_out(w, out, sizes, f, row0, dec_f16_f64, ok),
        (Factors::F32(..), _, _) => unreachable!("f32 accumulation only for 16-bit outputs of <= 32-bit weights"),
    }
}

/// A 16-bit output dtype of the f32 path: its rounding from f32, and where its
/// rounding boundaries (midpoints between neighbours) lie in f32 bit patterns.
trait Out16: Copy {
    /// f32 bits -> output bits, to nearest with ties to even.
    fn round(self, bits: u32) -> u16;
    /// The same for finite values below [`Out16::MAX_SAFE`] only (the fast path: NaN,
    /// infinities and overflow always go through the recomputation).
    fn round_finite(self, bits: u32) -> u16;
    /// f32 bits kept to locate the midpoint of the binade's output grid, and the
    /// pattern of the midpoint below them.
    const KEEP: u32;
    const MID: u32;
    /// |x| range where the output grid is the normal one (outside: always recompute).
    const MIN_NORMAL: f32;
    const MAX_SAFE: f32;
    /// Exponent bits of the output (all ones: infinite or NaN).
    const EXP: u16;
}

#[derive(Clone, Copy)]
struct Bf16Out;
impl Out16 for Bf16Out {
    #[inline(always)]
    fn round(self, bits: u32) -> u16 {
        bf16_bits(bits)
    }
    #[inline(always)]
    fn round_finite(self, bits: u32) -> u16 {
        (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
    }
    const KEEP: u32 = 0x7fff_0000;
    const MID: u32 = 0x0000_8000;
    const MIN_NORMAL: f32 = f32::MIN_POSITIVE;
    const MAX_SAFE: f32 = 3.3e38; // below the largest bf16 (3.39e38)
    const EXP: u16 = 0x7f80;
}

#[derive(Clone, Copy)]
struct F16Out;
impl Out16 for F16Out {
    #[inline(always)]
    fn round(self, bits: u32) -> u16 {
        f16::from_f32(f32::from_bits(bits)).to_bits()
    }
    #[inline(always)]
    fn round_finite(self, bits: u32) -> u16 {
        self.round(bits)
    }
    const KEEP: u32 = 0x7fff_e000;
    const MID: u32 = 0x0000_1000;
    const MIN_NORMAL: f32 = 6.103_515_6e-5; // 2^-14
    const MAX_SAFE: f32 = 65000.0; // below the largest f16 (65504)
    const EXP: u16 = 0x7c00;
}

/// The f32 merge loop over one tile of rows: for each chunk of columns, accumulate in
/// registers, decode the weights, round `W + acc` once; then recompute in f64 the
/// lanes whose f32 value lies too close to a rounding boundary for the accumulation
/// error bound (see [`Guard`]), so every output is the correctly rounded exact value.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_f32<D: Fn(&[u8]) -> [f32; LANES_F32], O: Out16>(
    w: &[u8],
    out: &mut [u8],
    (ws, os): (usize, usize),
    f: &LowRank<f32, LANES_F32>,
    g: &Guard,
    row0: usize,
    dec: D,
    o: O,
) -> RowStats {
    const N: usize = LANES_F32;
    let (cols, k) = (f.cols, f.k);
    let rows = out.len() / (cols * os);
    let chunks = cols.div_ceil(N);
    let block = COL_BLOCK / N;
    let mut bad = 0u32;
    let mut recomputed = 0u64;
    let mut cb = 0;
    while cb < chunks {
        let ce = (cb + block).min(chunks);
        for i in 0..rows {
            let row = row0 + i;
            let li = &f.l[row * k..(row + 1) * k];
            let bound = g.bound[row];
            for ch in cb..ce {
                let a = accumulate(li, &f.r[ch * k..(ch + 1) * k]);
                let j0 = ch * N;
                let m = N.min(cols - j0);
                let (wi, oi) = ((i * cols + j0) * ws, (i * cols + j0) * os);
                let wv = if m == N {
                    dec(&w[wi..wi + N * ws])
                } else {
                    let mut wb = [0u8; N * 4];
                    wb[..m * ws].copy_from_slice(&w[wi..wi + m * ws]);
                    dec(&wb[..N * ws])
                };
                let rmax = &g.rmax[ch];
                let mut h = [0u16; N];
                let mut unsure = [0u8; N];
                for q in 0..N {
                    // W + acc rounded to nearest in f32: within half an f32 ulp of
                    // W + acc, which the guard's 2^-21 |x| term covers.
                    let s = (wv[q] + a[q]).to_bits();
                    h[q] = o.round_finite(s);
                    let x = f32::from_bits(s & 0x7fff_ffff);
                    let mid = f32::from_bits((s & O::KEEP) | O::MID);
                    let dist = (x - mid).abs();
                    // Sure when half the in-binade distance to the midpoint (the nearest
                    // one may lie in the binade below, at least half as far) exceeds the
                    // accumulation bound plus 2^-21 |x| (two f32 ulps); all doubled here.
                    let err2 = bound * rmax[q] + x * (1.0 / 1_048_576.0);
                    let sure = (dist > err2) & (x >= O::MIN_NORMAL) & (x < O::MAX_SAFE);
                    unsure[q] = u8::from(!sure);
                }
                if unsure[..m].iter().fold(0u8, |acc, &u| acc | u) != 0 {
                    for q in (0..m).filter(|&q| unsure[q] != 0) {
                        recomputed += 1;
                        let j = j0 + q;
                        let mut acc = 0f64;
                        for (l, r) in g.l64[row * k..(row + 1) * k].iter().zip(&g.rt64[j * k..(j + 1) * k]) {
                            acc += l * r;
                        }
                        let odd = f64_to_f32_odd(f64::from_bits(sum_round_to_odd_f64(f64::from(wv[q]), acc)));
                        h[q] = o.round(odd.to_bits());
                        // Only here can a result be NaN or infinite (sure values are
                        // finite and below MAX_SAFE).
                        bad += u32::from((h[q] & O::EXP == O::EXP) & wv[q].is_finite());
                    }
                }
                for (dst, v) in out[oi..oi + m * os].chunks_exact_mut(2).zip(&h) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        cb = ce;
    }
    RowStats {
        nonfinite: u64::from(bad),
        recomputed,
    }
}

#[inline(always)]
fn tile_f64_out<D: Fn(&[u8]) -> [f64; LANES_F64]>(
    w: &[u8],
    out: &mut [u8],
    sizes: (usize, usize),
    f: &LowRank<f64, LANES_F64>,
    row0: usize,
    dec: D,
    ok: Float,
) -> RowStats {
    let nonfinite = match ok {
        Float::F64 => tile_generic(w, out, sizes, f, row0, dec, enc_f64_f64),
        Float::F32 => tile_generic(w, out, sizes, f, row0, dec, enc_f64_f32),
        Float::BF16 => tile_generic(w, out, sizes, f, row0, dec, enc_f64_bf16),
        Float::F16 => tile_generic(w, out, sizes, f, row0, dec, enc_f64_f16),
    };
    RowStats {
        nonfinite,
        recomputed: 0,
    }
}

/// `sum_t l[t] * r[t][q]` for each lane `q`, `t` ascending (the same order for every
/// element, whatever the vector width the compiler picks for the lanes).
#[inline(always)]
fn accumulate<T, const N: usize>(l: &[T], r: &[[T; N]]) -> [T; N]
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let mut a = [T::default(); N];
    for (&c, row) in l.iter().zip(r) {
        for q in 0..N {
            a[q] = a[q] + c * row[q];
        }
    }
    a
}

/// The merge loop over one tile of rows: for each chunk of `N` columns, accumulate
/// `L·R` in registers, decode the `N` weights, and encode the `N` results. A chunk cut
/// short by the end of a row goes through zero-padded buffers.
#[inline(always)]
fn tile_generic<T, const N: usize, D, E>(
    w: &[u8],
    out: &mut [u8],
    (ws, os): (usize, usize),
    f: &LowRank<T, N>,
    row0: usize,
    dec: D,
    enc: E,
) -> u64
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
    D: Fn(&[u8]) -> [T; N],
    E: Fn(&[T; N], &[T; N], &mut [u8]) -> u32,
{
    let (cols, k) = (f.cols, f.k);
    let rows = out.len() / (cols * os);
    let chunks = cols.div_ceil(N);
    let block = COL_BLOCK / N;
    let mut bad = 0u32;
    let mut cb = 0;
    while cb < chunks {
        let ce = (cb + block).min(chunks);
        for i in 0..rows {
            let li = &f.l[(row0 + i) * k..(row0 + i + 1) * k];
            for ch in cb..ce {
                let a = accumulate(li, &f.r[ch * k..(ch + 1) * k]);
                let j0 = ch * N;
                let m = N.min(cols - j0);
                let (wi, oi) = ((i * cols + j0) * ws, (i * cols + j0) * os);
                if m == N {
                    let wv = dec(&w[wi..wi + N * ws]);
                    bad += enc(&wv, &a, &mut out[oi..oi + N * os]);
                } else {
                    let mut wb = [0u8; 64 * 8];
                    wb[..m * ws].copy_from_slice(&w[wi..wi + m * ws]);
                    let wv = dec(&wb[..N * ws]);
                    let mut ob = [0u8; 64 * 8];
                    let mut tail_bad = enc(&wv, &a, &mut ob[..N * os]);
                    // padding lanes hold W = 0 and L·R = 0: never non-finite
                    tail_bad = tail_bad.min(m as u32);
                    bad += tail_bad;
                    out[oi..oi + m * os].copy_from_slice(&ob[..m * os]);
                }
            }
        }
        cb = ce;
    }
    u64::from(bad)
}

// Decoders: `N` little-endian values to the accumulation type.

#[inline(always)]
fn dec_bf16_f32(b: &[u8]) -> [f32; LANES_F32] {
    let mut v = [0f32; LANES_F32];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(2)) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
    v
}

#[inline(always)]
fn dec_f16_f32(b: &[u8]) -> [f32; LANES_F32] {
    let mut v = [0f32; LANES_F32];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(2)) {
        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
    v
}

#[inline(always)]
fn dec_f32_f32(b: &[u8]) -> [f32; LANES_F32] {
    let mut v = [0f32; LANES_F32];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    v
}

#[inline(always)]
fn dec_f64_f64(b: &[u8]) -> [f64; LANES_F64] {
    let mut v = [0f64; LANES_F64];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(8)) {
        *o = f64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    v
}

#[inline(always)]
fn dec_f32_f64(b: &[u8]) -> [f64; LANES_F64] {
    let mut v = [0f64; LANES_F64];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(4)) {
        *o = f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    v
}

#[inline(always)]
fn dec_bf16_f64(b: &[u8]) -> [f64; LANES_F64] {
    let mut v = [0f64; LANES_F64];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(2)) {
        *o = f64::from(f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16));
    }
    v
}

#[inline(always)]
fn dec_f16_f64(b: &[u8]) -> [f64; LANES_F64] {
    let mut v = [0f64; LANES_F64];
    for (o, c) in v.iter_mut().zip(b.chunks_exact(2)) {
        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64();
    }
    v
}

/// `w + a` rounded to odd in f32: exact when representable, otherwise the neighbour
/// (of the two around the exact sum) whose last mantissa bit is 1. An infinite sum
/// (overflow) or NaN input passes through.
#[cfg(test)]
#[inline(always)]
fn sum_round_to_odd_f32(w: f32, a: f32) -> u32 {
    let s = w + a;
    let bb = s - w;
    let err = (w - (s - bb)) + (a - bb); // exact: w + a == s + err (TwoSum)
    let inexact = (err < 0.0) | (err > 0.0); // false for NaN (overflow, NaN inputs)
    let toward_zero = inexact & ((err < 0.0) != (s < 0.0));
    (s.to_bits() - u32::from(toward_zero)) | u32::from(inexact)
}

#[inline(always)]
fn sum_round_to_odd_f64(w: f64, a: f64) -> u64 {
    let s = w + a;
    let bb = s - w;
    let err = (w - (s - bb)) + (a - bb);
    let inexact = (err < 0.0) | (err > 0.0);
    let toward_zero = inexact & ((err < 0.0) != (s < 0.0));
    (s.to_bits() - u64::from(toward_zero)) | u64::from(inexact)
}

/// `x` rounded to odd in f32 (as [`f32_round_to_odd`], without branches so that it
/// vectorises): exact when representable, else the odd one of the two neighbours.
#[inline(always)]
fn f64_to_f32_odd(x: f64) -> f32 {
    let nearest = x as f32;
    let back = f64::from(nearest);
    let inexact = back != x; // NaN: stays NaN whatever the last bit
    let toward_zero = inexact & (back.abs() > x.abs());
    f32::from_bits((nearest.to_bits() - u32::from(toward_zero)) | u32::from(inexact))
}

/// f32 bits to bfloat16 bits, to nearest with ties to even (NaN stays a quiet NaN).
#[inline(always)]
pub fn bf16_bits(b: u32) -> u16 {
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if nan {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

// Encoders of the f64 path: `round_once(w + a)` for `N` lanes into little-endian bytes; they return
// how many results are NaN or infinite where `w` is finite.

#[inline(always)]
fn enc_f64_f64(w: &[f64; LANES_F64], a: &[f64; LANES_F64], out: &mut [u8]) -> u32 {
    let mut bad = 0u32;
    for ((o, &wv), &av) in out.chunks_exact_mut(8).zip(w).zip(a) {
        let s = wv + av;
        o.copy_from_slice(&s.to_le_bytes());
        bad += u32::from(!s.is_finite() & wv.is_finite());
    }
    bad
}

#[inline(always)]
fn enc_f64_f32(w: &[f64; LANES_F64], a: &[f64; LANES_F64], out: &mut [u8]) -> u32 {
    let mut bad = 0u32;
    for ((o, &wv), &av) in out.chunks_exact_mut(4).zip(w).zip(a) {
        let s = f64::from_bits(sum_round_to_odd_f64(wv, av)) as f32;
        o.copy_from_slice(&s.to_le_bytes());
        bad += u32::from(!s.is_finite() & wv.is_finite());
    }
    bad
}

#[inline(always)]
fn enc_f64_bf16(w: &[f64; LANES_F64], a: &[f64; LANES_F64], out: &mut [u8]) -> u32 {
    let mut bad = 0u32;
    for ((o, &wv), &av) in out.chunks_exact_mut(2).zip(w).zip(a) {
        let h = bf16_bits(f64_to_f32_odd(f64::from_bits(sum_round_to_odd_f64(wv, av))).to_bits());
        o.copy_from_slice(&h.to_le_bytes());
        bad += u32::from((h & 0x7f80 == 0x7f80) & wv.is_finite());
    }
    bad
}

#[inline(always)]
fn enc_f64_f16(w: &[f64; LANES_F64], a: &[f64; LANES_F64], out: &mut [u8]) -> u32 {
    let mut bad = 0u32;
    for ((o, &wv), &av) in out.chunks_exact_mut(2).zip(w).zip(a) {
        let h = f16::from_f32(f64_to_f32_odd(f64::from_bits(sum_round_to_odd_f64(wv, av)))).to_bits();
        o.copy_from_slice(&h.to_le_bytes());
        bad += u32::from((h & 0x7c00 == 0x7c00) & wv.is_finite());
    }
    bad
}

/// Converts float values from `src` (dtype `sk`) into `out` (dtype `ok`), each rounded
/// once (nearest, ties to even), in parallel. Returns how many finite inputs became
/// infinite (overflow of the narrower dtype).
pub fn convert(src: &[u8], sk: Float, out: &mut [u8], ok: Float) -> u64 {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK * ok.size())
        .zip(src.par_chunks(CHUNK * sk.size()))
        .map(|(o, s)| convert_chunk(s, sk, o, ok))
        .sum()
}

fn convert_chunk(src: &[u8], sk: Float, out: &mut [u8], ok: Float) -> u64 {
    if sk == ok {
        out.copy_from_slice(src);
        return 0;
    }
    let values = decode_f64(sk, src);
    let mut bad = 0u64;
    for (j, &v) in values.iter().enumerate() {
        let nonfinite = match ok {
            Float::F64 => {
                out[j * 8..j * 8 + 8].copy_from_slice(&v.to_le_bytes());
                false
            }
            Float::F32 => {
                let x = v as f32;
                out[j * 4..j * 4 + 4].copy_from_slice(&x.to_le_bytes());
                !x.is_finite()
            }
            Float::BF16 => {
                let h = bf16_bits(f32_round_to_odd(v).to_bits());
                out[j * 2..j * 2 + 2].copy_from_slice(&h.to_le_bytes());
                h & 0x7f80 == 0x7f80
            }
            Float::F16 => {
                let h = f16::from_f32(f32_round_to_odd(v)).to_bits();
                out[j * 2..j * 2 + 2].copy_from_slice(&h.to_le_bytes());
                h & 0x7c00 == 0x7c00
            }
        };
        bad += u64::from(nonfinite & v.is_finite());
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Matrix;

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    fn encode(kind: Float, values: &[f64]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * kind.size()];
        let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        convert(&src, Float::F64, &mut out, kind);
        out
    }

    /// `x` rounded once to `kind` (the reference: every rounding helper of the crate
    /// is checked against exact rounding in `dtype.rs`).
    fn round_ref(x: f64, kind: Float) -> f64 {
        match kind {
            Float::F64 => x,
            Float::F32 => x as f32 as f64,
            Float::BF16 => Matrix::round_from_f64(&[x], Dtype::BF16).to_f64()[0],
            Float::F16 => Matrix::round_from_f64(&[x], Dtype::F16).to_f64()[0],
        }
    }

    /// One merge of a random weight against the float64 reference rounded once; a
    /// third of the weights are set to cancel their update almost exactly (the case
    /// where f32 accumulation alone would be several ulps off). Returns how many
    /// elements differ from the reference.
    fn check(w_kind: Float, out_kind: Float, rows: usize, cols: usize, rank: usize, transposed: bool) -> usize {
        let mut rnd = lcg((rows * 31 + cols * 7 + rank) as u64);
        let (d_out, d_in) = if transposed { (cols, rows) } else { (rows, cols) };
        let a: Vec<f64> = (0..rank * d_in).map(|_| (rnd() as f32) as f64).collect();
        let b: Vec<f64> = (0..d_out * rank).map(|_| (rnd() as f32) as f64 * 0.01).collect();
        let coef = 2.0;
        let delta = |i: usize, j: usize| {
            let (o, n) = if transposed { (j, i) } else { (i, j) };
            (0..rank).map(|q| b[o * rank + q] * a[q * d_in + n]).sum::<f64>() * coef
        };
        let w_vals: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let noise = rnd() * 0.05;
                if e % 3 == 0 {
                    -delta(e / cols, e % cols) * (1.0 + noise * 1e-3)
                } else {
                    noise
                }
            })
            .collect();
        let w = encode(w_kind, &w_vals);
        let w_exact = decode_f64(w_kind, &w);
        let term = Term {
            coef,
            a: &a,
            b: &b,
            rank,
            d_in,
            d_out,
            transposed,
        };
        let f = Factors::build(&[term], rows, cols, precision(w_kind, out_kind));
        let mut out = vec![0u8; rows * cols * out_kind.size()];
        assert_eq!(merge_rows(&w, w_kind, &mut out, out_kind, &f, 0).nonfinite, 0);
        let got = decode_f64(out_kind, &out);
        let mut differ = 0;
        for i in 0..rows {
            for j in 0..cols {
                let want = round_ref(w_exact[i * cols + j] + delta(i, j), out_kind);
                let g = got[i * cols + j];
                if g != want {
                    differ += 1;
                    let ulp = (round_ref(want * (1.0 + 2f64.powi(-6)), out_kind) - want).abs();
                    assert!(
                        (g - want).abs() <= ulp,
                        "{w_kind:?}->{out_kind:?} [{i},{j}]: {g} vs {want}"
                    );
                }
            }
        }
        differ
    }

    #[test]
    fn rounds_exactly_like_the_float64_reference_even_under_cancellation() {
        for (wk, ok) in [
            (Float::BF16, Float::BF16),
            (Float::F16, Float::F16),
            (Float::F32, Float::BF16),
            (Float::BF16, Float::F16),
            (Float::BF16, Float::F32),
            (Float::F32, Float::F32),
            (Float::F64, Float::BF16),
            (Float::F64, Float::F64),
        ] {
            for transposed in [false, true] {
                assert_eq!(
                    check(wk, ok, 37, 300, 5, transposed),
                    0,
                    "{wk:?}->{ok:?} transposed={transposed}"
                );
            }
        }
    }

    /// Without the guard, f32 accumulation would miss the reference on many of the
    /// cancelling elements: the test data does exercise the fallback.
    #[test]
    fn the_guard_is_needed_on_this_data() {
        let (rows, cols, rank) = (37, 300, 5);
        let mut rnd = lcg((rows * 31 + cols * 7 + rank) as u64);
        let a: Vec<f64> = (0..rank * cols).map(|_| (rnd() as f32) as f64).collect();
        let b: Vec<f64> = (0..rows * rank).map(|_| (rnd() as f32) as f64 * 0.01).collect();
        let term = Term {
            coef: 2.0,
            a: &a,
            b: &b,
            rank,
            d_in: cols,
            d_out: rows,
            transposed: false,
        };
        let Factors::F32(f, g) = Factors::build(&[term], rows, cols, Precision::F32) else {
            unreachable!()
        };
        let mut naive_misses = 0;
        for i in 0..rows {
            for j in 0..cols {
                let exact: f64 = g.l64[i * rank..(i + 1) * rank]
                    .iter()
                    .enumerate()
                    .map(|(t, l)| l * g.rt64[j * rank + t])
                    .sum();
                let mut acc = 0f32;
                for t in 0..rank {
                    acc += f.l[i * rank + t] * f.r[(j / LANES_F32) * rank + t][j % LANES_F32];
                }
                let w = -(exact as f32);
                let w = f32::from_bits(w.to_bits() & 0xffff_0000); // a bf16 weight
                let naive = bf16_bits(sum_round_to_odd_f32(w, acc));
                let want = Matrix::round_from_f64(&[f64::from(w) + exact], Dtype::BF16);
                if let Matrix::BF16(v) = want {
                    naive_misses += usize::from(v[0].to_bits() != naive);
                }
            }
        }
        assert!(naive_misses > 100, "{naive_misses}");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn portable_and_simd_kernels_agree_to_the_bit() {
        let mut rnd = lcg(9);
        let (rows, cols, rank) = (19, 517, 7);
        let a: Vec<f64> = (0..rank * cols).map(|_| rnd()).collect();
        let b: Vec<f64> = (0..rows * rank).map(|_| rnd() * 0.1).collect();
        for (wk, ok) in [
            (Float::BF16, Float::BF16),
            (Float::F16, Float::F16),
            (Float::BF16, Float::F32),
        ] {
            let w = encode(wk, &(0..rows * cols).map(|_| rnd()).collect::<Vec<_>>());
            let term = Term {
                coef: -0.7,
                a: &a,
                b: &b,
                rank,
                d_in: cols,
                d_out: rows,
                transposed: false,
            };
            let f = Factors::build(&[term], rows, cols, precision(wk, ok));
            let run = |portable: bool| {
                PORTABLE_ONLY.store(portable, std::sync::atomic::Ordering::SeqCst);
                let mut out = vec![0u8; rows * cols * ok.size()];
                merge_rows(&w, wk, &mut out, ok, &f, 0);
                out
            };
            let (simd, portable) = (run(false), run(true));
            PORTABLE_ONLY.store(false, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(simd, portable, "{wk:?}->{ok:?}");
        }
    }

    #[test]
    fn round_to_odd_sum_is_exact_rounding() {
        // 1 + 2^-9 + tiny: the tie 1 + 2^-8 of bf16 is not reached; the result must
        // round down in bf16 even though f32 RNE of the sum alone would be fine too.
        let w = 1.0f32;
        let a = 2f32.powi(-8); // exactly the bf16 tie between 1 and 1 + 2^-7
        assert_eq!(bf16_bits(sum_round_to_odd_f32(w, a)), 0x3f80, "tie to even (down)");
        let a_up = 2f32.powi(-8) + 2f32.powi(-30);
        // f32 RNE of 1 + a_up is exactly the tie 1 + 2^-8 (2^-30 is lost): rounding
        // that again would go down; the exact sum is above the tie and goes up.
        assert_eq!((w + a_up).to_bits(), (1.0f32 + 2f32.powi(-8)).to_bits());
        assert_eq!(bf16_bits(sum_round_to_odd_f32(w, a_up)), 0x3f81);
        let a_down = 2f32.powi(-8) - 2f32.powi(-31);
        assert_eq!(bf16_bits(sum_round_to_odd_f32(-w, -a_down)), 0xbf80);
        assert_eq!(bf16_bits(sum_round_to_odd_f32(-w, -a_up)), 0xbf81);
        // overflow and NaN pass through
        assert_eq!(bf16_bits(sum_round_to_odd_f32(f32::MAX, f32::MAX)), 0x7f80);
        assert!(f32::from_bits(sum_round_to_odd_f32(f32::NAN, 1.0)).is_nan());
        assert_eq!(bf16_bits(f32::NAN.to_bits()) & 0x7fc0, 0x7fc0);
    }

    #[test]
    fn overflow_is_counted() {
        let w = encode(Float::F16, &[60000.0, 1.0, f64::INFINITY]);
        let a = [1.0];
        let b = [10000.0, 1.0, 1.0];
        let term = Term {
            coef: 1.0,
            a: &a,
            b: &b,
            rank: 1,
            d_in: 1,
            d_out: 3,
            transposed: false,
        };
        let f = Factors::build(&[term], 3, 1, Precision::F32);
        let mut out = vec![0u8; 6];
        let stats = merge_rows(&w, Float::F16, &mut out, Float::F16, &f, 0);
        assert_eq!(stats.nonfinite, 1, "inf from finite W only");
        let big = encode(Float::F32, &[1e6, -1e6, 3.0]);
        let mut small = vec![0u8; 6];
        assert_eq!(convert(&big, Float::F32, &mut small, Float::F16), 2);
        assert_eq!(count_nonfinite(Float::F16, &small), 2);
    }
}
