//! The Gaussian source of generator `haar-v1`.
//!
//! Bits come from ChaCha12 (the block function of Bernstein's ChaCha with 12
//! rounds, 64-bit block counter, 64-bit nonce), as implemented by `rand_chacha`.
//! The key is derived from the adapter seed, the nonce is the stream id, and each
//! row of the Gaussian matrix starts at its own block offset, so rows can be drawn
//! in any order or in parallel and still give the same numbers.
//!
//! Normals come from Marsaglia's polar method written out here: `rand_distr`
//! reaches `ln`/`exp` through `num-traits`, whose `std` feature (switched on by
//! other crates in a build) silently swaps in the platform libm. We call the pure
//! Rust `libm` crate (pinned) and spell out every operation, in order, without FMA.

use rand_chacha::ChaCha12Rng;
use rand_core::{Rng, SeedableRng};

/// Fixed first half of the ChaCha key: separates our streams from other users of
/// ChaCha12 seeded with the same integer.
pub const KEY_DOMAIN: [u8; 16] = *b"asymlora/haar-v1";

/// Row `i` of a Gaussian matrix reads the keystream from block `i * ROW_BLOCK_STRIDE`.
/// A row of `d` normals uses about `2.55 * d` 32-bit words, far below 2^36.
pub const ROW_BLOCK_STRIDE: u64 = 1 << 32;

/// `2^-52`: maps a 53-bit integer onto `[0, 2)` exactly.
const TWO_POW_MINUS_52: f64 = 1.0 / 4_503_599_627_370_496.0;

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

/// A uniform double in `[-1, 1)` from the top 53 bits of one 64-bit draw.
#[inline]
fn signed_unit(bits: u64) -> f64 {
    ((bits >> 11) as f64) * TWO_POW_MINUS_52 - 1.0
}

/// One pair of independent standard normals (Marsaglia's polar method).
#[inline]
pub fn polar_pair(rng: &mut ChaCha12Rng) -> (f64, f64) {
    loop {
        let u = signed_unit(rng.next_u64());
        let v = signed_unit(rng.next_u64());
        let s = u * u + v * v;
        if s < 1.0 && s != 0.0 {
            let factor = (-2.0 * libm::log(s) / s).sqrt();
            return (u * factor, v * factor);
        }
    }
}

/// Fills `out` with standard normals, two per accepted pair; with an odd length
/// the second value of the last pair is dropped.
pub fn fill_standard_normal(rng: &mut ChaCha12Rng, out: &mut [f64]) {
    let mut pairs = out.chunks_exact_mut(2);
    for pair in &mut pairs {
        let (a, b) = polar_pair(rng);
        pair[0] = a;
        pair[1] = b;
    }
    if let [last] = pairs.into_remainder() {
        *last = polar_pair(rng).0;
    }
}

/// Row `row` (length `cols`) of the Gaussian matrix for (`seed`, `stream`).
pub fn gaussian_row(seed: u64, stream: u64, row: u64, out: &mut [f64]) {
    fill_standard_normal(&mut row_rng(seed, stream, row), out);
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
    fn unit_interval_edges() {
        assert_eq!(signed_unit(0), -1.0);
        assert_eq!(signed_unit(u64::MAX), 1.0 - TWO_POW_MINUS_52);
        assert_eq!(signed_unit(1 << 63), 0.0);
    }

    #[test]
    fn odd_length_drops_second_of_last_pair() {
        let mut even = [0.0; 6];
        let mut odd = [0.0; 5];
        gaussian_row(1, 2, 0, &mut even);
        gaussian_row(1, 2, 0, &mut odd);
        assert_eq!(&even[..5], &odd[..]);
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
