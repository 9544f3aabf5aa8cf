//! The Gaussian source of generator `haar-v1`.
//!
//! Bits come from ChaCha12 (the block function of Bernstein's ChaCha with 12
//! rounds, 64-bit block counter, 64-bit nonce), as implemented by `rand_chacha`.
//! The key is derived from the adapter seed, the nonce is the stream id, and each
//! row of the Gaussian matrix starts at its own block offset, so rows can be drawn
//! in any order or in parallel and still give the same numbers.
//!
//! Normals come from a 256-layer ziggurat (Marsaglia & Tsang 2000, as in
//! `rand_distr`), written out here rather than taken from `rand_distr`: its normal
//! sampler reaches `exp`/`ln` through `num-traits`, whose `std` feature (switched on
//! by other crates in a build) silently swaps in the platform libm, and its tables
//! and bit usage are not promised to stay fixed. Our tables are literals (exact
//! bits); the rare wedge and tail steps call the pure-Rust `libm` crate (pinned).
//! Every operation is spelled out in order, with no FMA.

mod ziggurat_tables;

/// The authoritative tables (published bit for bit in docs/haar-v1-ziggurat-tables.json).
pub use ziggurat_tables::{ZIG_F, ZIG_X};

use rand_chacha::ChaCha12Rng;
use rand_core::{Rng, SeedableRng};

/// Fixed first half of the ChaCha key: separates our streams from other users of
/// ChaCha12 seeded with the same integer.
pub const KEY_DOMAIN: [u8; 16] = *b"asymlora/haar-v1";

/// Row `i` of a Gaussian matrix reads the keystream from block `i * ROW_BLOCK_STRIDE`.
/// A row of `d` normals uses about `2.04 * d` 32-bit words (1.02 draws per normal),
/// far below the 2^36 words between rows.
pub const ROW_BLOCK_STRIDE: u64 = 1 << 32;

/// `2^-52`: maps a 53-bit integer onto `[0, 2)` exactly.
const TWO_POW_MINUS_52: f64 = 1.0 / 4_503_599_627_370_496.0;
/// `2^-53`: maps a 53-bit integer onto `[0, 1)` exactly.
const TWO_POW_MINUS_53: f64 = 1.0 / 9_007_199_254_740_992.0;

/// Start of the ziggurat's tail (the right edge of layer 1).
pub const ZIG_R: f64 = 3.654152885361009; // published as 3.6541528853610088 (same bits)
/// Area of each ziggurat layer, the same for all 256.
pub const ZIG_V: f64 = 0.00492867323399;

/// The 32-byte ChaCha key for `seed`: the domain tag, `seed` little-endian, 8 zero bytes.
pub fn chacha_key(seed: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&KEY_DOMAIN);
    key[16..24].copy_from_slice(&seed.to_le_bytes());
    key
}

/// The keystream that row `row` of the Gaussian matrix for (`seed`, `stream`) reads.
pub fn row_rng(seed: u64, stream: u64, row: u64) -> ChaCha12Rng {
    let mut rng = ChaCha12Rng::from_seed(chacha_key(seed));
    rng.set_stream(stream);
    // word position = block index * 16 words per block
    rng.set_word_pos(u128::from(row) * u128::from(ROW_BLOCK_STRIDE) * 16);
    rng
}

/// The top 53 bits of a draw as a double, exactly. Converted through `i64` (the value
/// is below 2^53, so both conversions are exact and equal): x86-64 has a one-instruction
/// signed conversion, while `u64 as f64` needs a branchy sequence there.
#[inline]
fn top53(bits: u64) -> f64 {
    ((bits >> 11) as i64) as f64
}

/// A uniform double in `[-1, 1)` from the top 53 bits of one 64-bit draw.
#[inline]
fn signed_unit(bits: u64) -> f64 {
    top53(bits) * TWO_POW_MINUS_52 - 1.0
}

/// A uniform double in `[0, 1)` from the top 53 bits of one 64-bit draw.
#[inline]
fn unit(bits: u64) -> f64 {
    top53(bits) * TWO_POW_MINUS_53
}

/// A uniform double in `(0, 1)` (never 0, so its logarithm is finite).
#[inline]
fn open_unit(bits: u64) -> f64 {
    (((bits >> 12) as f64) + 0.5) * TWO_POW_MINUS_52
}

/// A source of 64-bit draws read in keystream order.
pub trait Draws {
    fn next_draw(&mut self) -> u64;
}

impl Draws for ChaCha12Rng {
    #[inline]
    fn next_draw(&mut self) -> u64 {
        self.next_u64()
    }
}

/// Draws per refill of [`BufferedDraws`] (32 ChaCha blocks).
const DRAW_BUFFER: usize = 256;

/// The draws of a keystream, read [`DRAW_BUFFER`] at a time: the same values in the
/// same order as `next_u64`, without its per-call bookkeeping. It reads the keystream
/// up to a buffer past the last draw used, so only for a keystream used once (a row).
pub struct BufferedDraws {
    rng: ChaCha12Rng,
    bytes: [u8; DRAW_BUFFER * 8],
    pos: usize,
}

impl BufferedDraws {
    pub fn new(rng: ChaCha12Rng) -> Self {
        BufferedDraws {
            rng,
            bytes: [0; DRAW_BUFFER * 8],
            pos: DRAW_BUFFER,
        }
    }
}

impl Draws for BufferedDraws {
    #[inline]
    fn next_draw(&mut self) -> u64 {
        if self.pos == DRAW_BUFFER {
            // Draw `j` of a block is words 2j (low) and 2j+1 (high): 8 keystream bytes, little-endian.
            self.rng.fill_bytes(&mut self.bytes);
            self.pos = 0;
        }
        let at = self.pos * 8;
        self.pos += 1;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }
}

/// One standard normal.
///
/// A draw `b` picks layer `i = b & 255` and `x = signed_unit(b) * X[i]`; inside the
/// layer's rectangle (`|x| < X[i+1]`) that is the sample. Otherwise layer 0 samples
/// the tail beyond `R`, and other layers accept `x` if a point drawn uniformly in
/// the wedge falls under the density; on rejection, start over with a new draw.
#[inline]
pub fn standard_normal(rng: &mut impl Draws) -> f64 {
    loop {
        let bits = rng.next_draw();
        let i = (bits & 0xff) as usize;
        let x = signed_unit(bits) * ZIG_X[i];
        if x.abs() < ZIG_X[i + 1] {
            return x;
        }
        if let Some(z) = outside_rectangle(rng, i, x) {
            return z;
        }
    }
}

/// The rare steps of [`standard_normal`] (about 1.5 % of draws), out of line so
/// that the common one stays a tight loop: the tail for layer 0, else the wedge
/// test (`None`: rejected, start over).
#[cold]
#[inline(never)]
fn outside_rectangle(rng: &mut impl Draws, i: usize, x: f64) -> Option<f64> {
    if i == 0 {
        return Some(normal_tail(rng, x < 0.0));
    }
    let y = ZIG_F[i + 1] + unit(rng.next_draw()) * (ZIG_F[i] - ZIG_F[i + 1]);
    (y < libm::exp(-0.5 * x * x)).then_some(x)
}

/// A normal conditioned on `|z| > R` (Marsaglia 1964), with the given sign.
fn normal_tail(rng: &mut impl Draws, negative: bool) -> f64 {
    loop {
        let x = libm::log(open_unit(rng.next_draw())) / ZIG_R;
        let y = libm::log(open_unit(rng.next_draw()));
        if -2.0 * y >= x * x {
            return if negative { x - ZIG_R } else { ZIG_R - x };
        }
    }
}

/// The tables as the Marsaglia-Tsang recursion gives them with the pinned `libm`;
/// `ziggurat_tables.rs` holds this output as literals (a test keeps them equal).
pub fn ziggurat_tables_from_recursion() -> (Vec<f64>, Vec<f64>) {
    let density = |x: f64| libm::exp(-0.5 * x * x);
    let mut x = vec![0.0f64; 257];
    x[0] = ZIG_V / density(ZIG_R);
    x[1] = ZIG_R;
    for i in 1..255 {
        x[i + 1] = (-2.0 * libm::log(ZIG_V / x[i] + density(x[i]))).sqrt();
    }
    x[256] = 0.0;
    let f = x.iter().map(|&xi| density(xi)).collect();
    (x, f)
}

/// Fills `out` with standard normals, in order.
pub fn fill_standard_normal(rng: &mut impl Draws, out: &mut [f64]) {
    out.iter_mut().for_each(|z| *z = standard_normal(rng));
}

/// Row `row` (length `cols`) of the Gaussian matrix for (`seed`, `stream`).
pub fn gaussian_row(seed: u64, stream: u64, row: u64, out: &mut [f64]) {
    fill_standard_normal(&mut BufferedDraws::new(row_rng(seed, stream, row)), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent ChaCha12 block function (DJB layout: 64-bit counter in words
    /// 12-13, 64-bit nonce in words 14-15), to pin what `rand_chacha` must produce.
    fn reference_block(key: &[u8; 32], counter: u64, nonce: u64) -> [u32; 16] {
        let mut s = [0u32; 16];
        s[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
        for i in 0..8 {
            s[4 + i] = u32::from_le_bytes(key[4 * i..4 * i + 4].try_into().unwrap());
        }
        s[12] = counter as u32;
        s[13] = (counter >> 32) as u32;
        s[14] = nonce as u32;
        s[15] = (nonce >> 32) as u32;
        let mut x = s;
        fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
            x[a] = x[a].wrapping_add(x[b]);
            x[d] = (x[d] ^ x[a]).rotate_left(16);
            x[c] = x[c].wrapping_add(x[d]);
            x[b] = (x[b] ^ x[c]).rotate_left(12);
            x[a] = x[a].wrapping_add(x[b]);
            x[d] = (x[d] ^ x[a]).rotate_left(8);
            x[c] = x[c].wrapping_add(x[d]);
            x[b] = (x[b] ^ x[c]).rotate_left(7);
        }
        for _ in 0..6 {
            qr(&mut x, 0, 4, 8, 12);
            qr(&mut x, 1, 5, 9, 13);
            qr(&mut x, 2, 6, 10, 14);
            qr(&mut x, 3, 7, 11, 15);
            qr(&mut x, 0, 5, 10, 15);
            qr(&mut x, 1, 6, 11, 12);
            qr(&mut x, 2, 7, 8, 13);
            qr(&mut x, 3, 4, 9, 14);
        }
        for i in 0..16 {
            x[i] = x[i].wrapping_add(s[i]);
        }
        x
    }

    #[test]
    fn keystream_matches_reference_chacha12() {
        let (seed, stream, row) = (0x0123_4567_89ab_cdef, 7, 3);
        let key = chacha_key(seed);
        let mut rng = row_rng(seed, stream, row);
        let first_block = row * ROW_BLOCK_STRIDE;
        for block in 0..3 {
            let words = reference_block(&key, first_block + block, stream);
            for pair in words.chunks_exact(2) {
                let expected = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
                assert_eq!(rng.next_u64(), expected);
            }
        }
    }

    #[test]
    fn buffered_draws_are_the_keystream() {
        let mut direct = row_rng(9, 8, 7);
        let mut buffered = BufferedDraws::new(row_rng(9, 8, 7));
        for _ in 0..3 * DRAW_BUFFER + 5 {
            assert_eq!(buffered.next_draw(), direct.next_u64());
        }
        // Normals through either source, over many rare steps.
        let (mut a, mut b) = (vec![0.0; 20_000], vec![0.0; 20_000]);
        fill_standard_normal(&mut row_rng(1, 2, 3), &mut a);
        gaussian_row(1, 2, 3, &mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn top53_is_exact() {
        for bits in [0, u64::MAX, 1 << 63, (1 << 63) - 1, 0x3ed3_06af_9cd8_2c68] {
            assert_eq!(top53(bits), (bits >> 11) as f64);
        }
    }

    #[test]
    fn unit_interval_edges() {
        assert_eq!(signed_unit(0), -1.0);
        assert_eq!(signed_unit(u64::MAX), 1.0 - TWO_POW_MINUS_52);
        assert_eq!(signed_unit(1 << 63), 0.0);
    }

    #[test]
    fn shorter_row_is_a_prefix() {
        let mut long = [0.0; 6];
        let mut short = [0.0; 5];
        gaussian_row(1, 2, 0, &mut long);
        gaussian_row(1, 2, 0, &mut short);
        assert_eq!(&long[..5], &short[..]);
    }

    #[test]
    fn literal_tables_equal_the_recursion() {
        let (x, f) = ziggurat_tables_from_recursion();
        for i in 0..257 {
            assert_eq!(x[i].to_bits(), ZIG_X[i].to_bits(), "X[{i}]");
            assert_eq!(f[i].to_bits(), ZIG_F[i].to_bits(), "F[{i}]");
        }
        // The recursion closes: layer 255 reaches (almost exactly) the peak.
        let closing = ZIG_V / x[255] + f[255];
        assert!((closing - 1.0).abs() < 1e-9, "{closing}");
    }

    #[test]
    fn unit_maps() {
        assert_eq!(unit(0), 0.0);
        assert_eq!(unit(u64::MAX), 1.0 - TWO_POW_MINUS_53);
        assert!(open_unit(0) > 0.0 && open_unit(u64::MAX) < 1.0);
    }

    #[test]
    fn tail_samples_lie_beyond_r() {
        let mut rng = row_rng(3, 4, 0);
        for _ in 0..1000 {
            assert!(normal_tail(&mut rng, false) > ZIG_R);
            assert!(normal_tail(&mut rng, true) < -ZIG_R);
        }
    }

    #[test]
    fn moments_are_standard() {
        let mut rng = row_rng(11, 0, 0);
        let n = 400_000;
        let (mut s1, mut s2, mut s4, mut beyond_r) = (0.0, 0.0, 0.0, 0);
        for _ in 0..n {
            let z = standard_normal(&mut rng);
            s1 += z;
            s2 += z * z;
            s4 += z * z * z * z;
            beyond_r += usize::from(z.abs() > ZIG_R);
        }
        let n = n as f64;
        assert!((s1 / n).abs() < 5.0 / n.sqrt(), "mean {}", s1 / n);
        assert!((s2 / n - 1.0).abs() < 5.0 * 2f64.sqrt() / n.sqrt(), "var {}", s2 / n);
        assert!(
            (s4 / n - 3.0).abs() < 5.0 * 96f64.sqrt() / n.sqrt(),
            "kurtosis {}",
            s4 / n
        );
        // P(|Z| > R) = 2.58e-4: about 103 of 400k.
        assert!((60..150).contains(&beyond_r), "{beyond_r}");
    }

    #[test]
    fn rows_are_independent_of_each_other() {
        let mut a = [0.0; 8];
        let mut b = [0.0; 8];
        gaussian_row(5, 0, 0, &mut a);
        gaussian_row(5, 0, 1, &mut b);
        assert_ne!(a, b);
        let mut c = [0.0; 8];
        gaussian_row(5, 1, 0, &mut c);
        assert_ne!(a, c);
    }
}
