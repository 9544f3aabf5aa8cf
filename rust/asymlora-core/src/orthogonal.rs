//! Seeded random-orthogonal `A` factors (generator `haar-v1`).
//!
//! `A` (r x d_in, orthonormal rows) = transpose of the sign-fixed thin-QR `Q` of
//! the transpose of a Gaussian matrix `G` (r x d_in) drawn from (seed, stream),
//! times `gain`, rounded once to the output dtype. See docs/generator-haar-v1.md.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::dtype::{Dtype, Matrix};
use crate::error::{Error, Result};
use crate::householder::haar_q;
use crate::prng::gaussian_row;

/// A named generator of `A` factors. New algorithms get new names; old names keep
/// producing the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Generator {
    #[default]
    HaarV1,
}

impl Generator {
    pub const ALL: [Generator; 1] = [Generator::HaarV1];

    pub fn name(self) -> &'static str {
        match self {
            Generator::HaarV1 => "haar-v1",
        }
    }
}

impl fmt::Display for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Generator {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Generator::ALL.into_iter().find(|g| g.name() == s).ok_or_else(|| {
            let known: Vec<_> = Generator::ALL.iter().map(|g| g.name()).collect();
            Error::invalid(
                "generator",
                format!("unknown generator {s:?}; this version knows {}", known.join(", ")),
            )
        })
    }
}

/// Everything that determines one `A`, apart from the output dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrthogonalSpec {
    pub rank: usize,
    pub d_in: usize,
    pub seed: u64,
    pub stream: u64,
    pub gain: f64,
}

impl OrthogonalSpec {
    pub fn new(rank: usize, d_in: usize, seed: u64, stream: u64) -> Self {
        OrthogonalSpec {
            rank,
            d_in,
            seed,
            stream,
            gain: 1.0,
        }
    }

    pub fn with_gain(self, gain: f64) -> Self {
        OrthogonalSpec { gain, ..self }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid("r", "rank must be at least 1"));
        }
        if self.rank > self.d_in {
            return Err(Error::invalid(
                "r",
                format!(
                    "rank {} exceeds d_in {}: at most d_in rows can be orthonormal",
                    self.rank, self.d_in
                ),
            ));
        }
        if !self.gain.is_finite() || self.gain == 0.0 {
            return Err(Error::invalid(
                "gain",
                format!("gain must be finite and non-zero, got {}", self.gain),
            ));
        }
        Ok(())
    }
}

/// The Gaussian matrix `G` (r x d_in, row-major) behind an `A`, in `f64`.
pub fn gaussian_matrix(rank: usize, d_in: usize, seed: u64, stream: u64) -> Vec<f64> {
    let mut g = vec![0.0f64; rank * d_in];
    if d_in > 0 {
        g.par_chunks_mut(d_in)
            .enumerate()
            .for_each(|(row, out)| gaussian_row(seed, stream, row as u64, out));
    }
    g
}

/// `gain * A` in `f64` before the final rounding (row-major r x d_in).
pub fn random_orthogonal_f64(spec: &OrthogonalSpec) -> Result<Vec<f64>> {
    spec.validate()?;
    // Rows of G are the columns of G^T, which is the layout `haar_q` expects; its
    // output columns are the columns of Q, i.e. the rows of A = Q^T.
    let mut g = gaussian_matrix(spec.rank, spec.d_in, spec.seed, spec.stream);
    let mut a = haar_q(&mut g, spec.d_in, spec.rank);
    if spec.gain != 1.0 {
        a.iter_mut().for_each(|x| *x *= spec.gain);
    }
    Ok(a)
}

/// One `A` factor in `dtype`, row-major r x d_in.
pub fn random_orthogonal(spec: &OrthogonalSpec, dtype: Dtype) -> Result<Matrix> {
    Ok(Matrix::round_from_f64(&random_orthogonal_f64(spec)?, dtype))
}

/// Many `A` factors at once, in parallel on the current rayon pool. The output
/// order follows `specs`; each matrix is the same as from [`random_orthogonal`].
pub fn random_orthogonal_many(specs: &[OrthogonalSpec], dtype: Dtype) -> Result<Vec<Matrix>> {
    for spec in specs {
        spec.validate()?;
    }
    specs.par_iter().map(|spec| random_orthogonal(spec, dtype)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_names() {
        assert_eq!("haar-v1".parse::<Generator>().unwrap(), Generator::HaarV1);
        let err = "haar-v9".parse::<Generator>().unwrap_err().to_string();
        assert!(err.contains("haar-v9") && err.contains("haar-v1"), "{err}");
    }

    #[test]
    fn bad_shapes_name_the_argument() {
        let err = random_orthogonal(&OrthogonalSpec::new(0, 4, 0, 0), Dtype::F32).unwrap_err();
        assert!(err.to_string().contains("`r`"));
        let err = random_orthogonal(&OrthogonalSpec::new(5, 4, 0, 0), Dtype::F32).unwrap_err();
        assert!(err.to_string().contains("exceeds d_in 4"));
        let err = random_orthogonal(&OrthogonalSpec::new(1, 4, 0, 0).with_gain(0.0), Dtype::F32).unwrap_err();
        assert!(err.to_string().contains("non-zero"));
        let err = random_orthogonal(&OrthogonalSpec::new(1, 4, 0, 0).with_gain(f64::NAN), Dtype::F32).unwrap_err();
        assert!(err.to_string().contains("`gain`"));
    }

    #[test]
    fn gain_scales_before_the_single_rounding() {
        let spec = OrthogonalSpec::new(3, 10, 1, 2);
        let base = random_orthogonal_f64(&spec).unwrap();
        let scaled = random_orthogonal_f64(&spec.with_gain(0.5)).unwrap();
        for (b, s) in base.iter().zip(&scaled) {
            assert_eq!(b * 0.5, *s);
        }
    }
}
