//! Output dtypes of the generator and their single rounding step from `f64`.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::error::Error;

/// A floating-point storage type for generated factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

    /// The numpy/torch-style name used in configs and the Python API.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::BF16 => safetensors::Dtype::BF16,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "float32" | "f32" | "F32" => Ok(Dtype::F32),
            "float16" | "f16" | "F16" | "half" => Ok(Dtype::F16),
            "bfloat16" | "bf16" | "BF16" => Ok(Dtype::BF16),
            other => Err(Error::invalid(
                "dtype",
                format!("unknown dtype {other:?}; expected one of float32, float16, bfloat16"),
            )),
        }
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Files accept only the canonical names ("float32", ...); aliases are for callers.
impl<'de> serde::Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Dtype::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown dtype {name:?}; expected one of float32, float16, bfloat16"
            ))
        })
    }
}

/// The floating-point safetensors dtypes: what adapter factors, full tensors and merged
/// weights may be stored as.
pub const FLOAT_DTYPES: [safetensors::Dtype; 4] = [
    safetensors::Dtype::F16,
    safetensors::Dtype::BF16,
    safetensors::Dtype::F32,
    safetensors::Dtype::F64,
];

/// Whether `dtype` is one of [`FLOAT_DTYPES`].
pub fn is_float(dtype: safetensors::Dtype) -> bool {
    FLOAT_DTYPES.contains(&dtype)
}

/// The safetensors dtype a file header writes as `code` ("F32", "BF16", "I64", ...).
/// The names are the safetensors crate's own (its `Display` writes them), so they are
/// parsed by its own deserializer rather than by a second table here.
pub fn st_dtype_from_code(code: &str) -> Option<safetensors::Dtype> {
    serde_json::from_value(serde_json::Value::String(code.to_string())).ok()
}

/// Values of a little-endian tensor of a float `dtype` ([`FLOAT_DTYPES`]), widened
/// exactly to f64; `None` for any other dtype.
pub fn decode_float(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    use safetensors::Dtype as St;
    Some(match dtype {
        St::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        St::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16) as f64)
            .collect(),
        St::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        St::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect(),
        _ => return None,
    })
}

/// `values` rounded once (to nearest, ties to even) to a float `dtype`, as
/// little-endian bytes; `None` for any other dtype.
pub fn encode_float(dtype: safetensors::Dtype, values: &[f64]) -> Option<Vec<u8>> {
    use safetensors::Dtype as St;
    let rounded = match dtype {
        St::F64 => return Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        St::F32 => Matrix::round_from_f64(values, Dtype::F32),
        St::F16 => Matrix::round_from_f64(values, Dtype::F16),
        St::BF16 => Matrix::round_from_f64(values, Dtype::BF16),
        _ => return None,
    };
    Some(rounded.to_le_bytes())
}

/// `x` rounded to `f32` toward zero, with the last bit forced to 1 when inexact.
pub fn f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if !x.is_finite() || f64::from(nearest) == x {
        return nearest;
    }
    let mut bits = nearest.to_bits();
    if f64::from(nearest).abs() > x.abs() {
        bits -= 1; // one step toward zero (infinity steps down to MAX)
    }
    f32::from_bits(bits | 1)
}

/// A row-major matrix in one of the output dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum Matrix {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Matrix {
    /// Rounds `f64` values once, to nearest with ties to even, into `dtype`.
    ///
    /// `half`'s `from_f64` goes through `f32` with round-to-nearest, which rounds
    /// twice (see the `single_rounding` tests). We go through `f32` with
    /// round-to-odd instead: with at least two spare bits in the intermediate
    /// (24 vs 11 or 8), the second rounding then equals one direct rounding.
    pub fn round_from_f64(values: &[f64], dtype: Dtype) -> Matrix {
        match dtype {
            Dtype::F32 => Matrix::F32(values.iter().map(|&v| v as f32).collect()),
            Dtype::F16 => Matrix::F16(values.iter().map(|&v| f16::from_f32(f32_round_to_odd(v))).collect()),
            Dtype::BF16 => Matrix::BF16(values.iter().map(|&v| bf16::from_f32(f32_round_to_odd(v))).collect()),
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Matrix::F32(_) => Dtype::F32,
            Matrix::F16(_) => Dtype::F16,
            Matrix::BF16(_) => Dtype::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Matrix::F32(v) => v.len(),
            Matrix::F16(v) => v.len(),
            Matrix::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Matrices of one dtype stacked in order (e.g. the `[E, r, d_in]` `A` of E experts).
    pub fn concat(parts: Vec<Matrix>) -> Matrix {
        let mut parts = parts.into_iter();
        let Some(mut out) = parts.next() else {
            return Matrix::F32(vec![]);
        };
        for part in parts {
            match (&mut out, part) {
                (Matrix::F32(a), Matrix::F32(b)) => a.extend(b),
                (Matrix::F16(a), Matrix::F16(b)) => a.extend(b),
                (Matrix::BF16(a), Matrix::BF16(b)) => a.extend(b),
                _ => panic!("Matrix::concat of different dtypes"),
            }
        }
        out
    }

    /// Little-endian bytes, the layout of safetensors and of the golden hashes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Matrix::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Matrix::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Matrix::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        }
    }

    /// Values widened exactly to `f64` (for checks and statistics).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Matrix::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Matrix::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Matrix::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_codes_round_trip() {
        use safetensors::Dtype as St;
        for d in [
            St::F64,
            St::F32,
            St::F16,
            St::BF16,
            St::I64,
            St::U8,
            St::BOOL,
            St::F8_E4M3,
        ] {
            assert_eq!(st_dtype_from_code(&d.to_string()), Some(d));
        }
        assert_eq!(st_dtype_from_code("float32"), None);
        assert!(is_float(St::BF16) && !is_float(St::I64));
    }

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
        }
        let err = "float8".parse::<Dtype>().unwrap_err().to_string();
        assert!(err.contains("`dtype`") && err.contains("float8"), "{err}");
    }

    #[test]
    fn single_rounding_f16() {
        // 1 + 2^-11 is the tie between 1 and the next f16; the 2^-40 makes it round up.
        // Through f32 the 2^-40 is lost and the tie goes to even (1.0).
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let Matrix::F16(v) = Matrix::round_from_f64(&[x], Dtype::F16) else {
            unreachable!()
        };
        assert_eq!(v[0].to_f64(), 1.0 + 2f64.powi(-10));
        assert_eq!(f16::from_f32(x as f32).to_f64(), 1.0);
    }

    #[test]
    fn round_to_odd_edges() {
        assert_eq!(f32_round_to_odd(1.5), 1.5);
        assert_eq!(f32_round_to_odd(f64::INFINITY), f32::INFINITY);
        assert_eq!(f32_round_to_odd(1e300), f32::MAX);
        assert_eq!(f32_round_to_odd(-1e300), -f32::MAX);
        assert_eq!(f32_round_to_odd(1e-300).to_bits(), 1);
        let above_one = 1.0 + 2f64.powi(-40);
        assert_eq!(f32_round_to_odd(above_one).to_bits(), 1f32.to_bits() | 1);
        assert_eq!(f32_round_to_odd(-above_one).to_bits(), (-1f32).to_bits() | 1);
    }

    /// Exhaustive cross-check against an exact rounding of f64 to f16 over a
    /// spread of awkward values (ties, near-ties, subnormals, overflow).
    #[test]
    fn f16_matches_exact_rounding() {
        let exact = |x: f64| -> f64 {
            // candidates: every finite f16 near x, pick nearest, ties to even mantissa
            let lo = f16::from_f64(x);
            let mut best = lo;
            for bits in [lo.to_bits().wrapping_sub(1), lo.to_bits(), lo.to_bits().wrapping_add(1)] {
                let c = f16::from_bits(bits);
                if !c.is_finite() && !lo.is_infinite() {
                    continue;
                }
                let (dc, db) = ((c.to_f64() - x).abs(), (best.to_f64() - x).abs());
                if dc < db || (dc == db && bits & 1 == 0) {
                    best = c;
                }
            }
            best.to_f64()
        };
        let mut checked = 0;
        for bits in (0x3000u16..0x3400).chain(0x0001..0x0040) {
            let a = f16::from_bits(bits).to_f64();
            let b = f16::from_bits(bits + 1).to_f64();
            let mid = (a + b) / 2.0;
            for x in [mid, mid + mid * 1e-12, mid - mid * 1e-12, a, b] {
                let Matrix::F16(v) = Matrix::round_from_f64(&[x], Dtype::F16) else {
                    unreachable!()
                };
                assert_eq!(v[0].to_f64(), exact(x), "x = {x:e}");
                checked += 1;
            }
        }
        assert!(checked > 5000);
    }

    #[test]
    fn single_rounding_bf16() {
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        let Matrix::BF16(v) = Matrix::round_from_f64(&[x], Dtype::BF16) else {
            unreachable!()
        };
        assert_eq!(v[0].to_f64(), 1.0 + 2f64.powi(-7));
        assert_eq!(bf16::from_f32(x as f32).to_f64(), 1.0);
    }

    #[test]
    fn ties_go_to_even() {
        let tie_down = 1.0 + 2f64.powi(-11); // between 1.0 (even) and 1+2^-10 (odd)
        let tie_up = 1.0 + 3.0 * 2f64.powi(-11); // between 1+2^-10 (odd) and 1+2^-9 (even)
        let Matrix::F16(v) = Matrix::round_from_f64(&[tie_down, tie_up], Dtype::F16) else {
            unreachable!()
        };
        assert_eq!(v[0].to_f64(), 1.0);
        assert_eq!(v[1].to_f64(), 1.0 + 2f64.powi(-9));
    }
}
