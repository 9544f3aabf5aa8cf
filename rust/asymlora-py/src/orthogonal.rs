//! Generator bindings. Half-precision results cross as `uint16` bit patterns; the
//! Python layer views them as `float16` or `ml_dtypes.bfloat16`.

use asymlora_core::orthogonal::gaussian_matrix as core_gaussian;
use asymlora_core::{Dtype, Matrix, OrthogonalSpec};
use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;

use crate::errors::{thread_pool, to_py};

fn to_numpy(py: Python<'_>, matrix: Matrix, rows: usize, cols: usize) -> PyResult<Py<PyAny>> {
    let shape = [rows, cols];
    let array = match matrix {
        Matrix::F32(v) => PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
        Matrix::F16(v) => PyArray1::from_vec(py, v.into_iter().map(|x| x.to_bits()).collect())
            .reshape(shape)?
            .into_any(),
        Matrix::BF16(v) => PyArray1::from_vec(py, v.into_iter().map(|x| x.to_bits()).collect())
            .reshape(shape)?
            .into_any(),
    };
    Ok(array.unbind())
}

fn parse_dtype(dtype: &str) -> PyResult<Dtype> {
    dtype.parse().map_err(to_py)
}

/// One `A` (r x d_in) with orthonormal rows.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // mirrors the Python signature, keyword arguments
#[pyo3(signature = (r, d_in, seed, stream = 0, dtype = "float32", gain = 1.0, threads = None))]
fn random_orthogonal(
    py: Python<'_>,
    r: usize,
    d_in: usize,
    seed: u64,
    stream: u64,
    dtype: &str,
    gain: f64,
    threads: Option<usize>,
) -> PyResult<Py<PyAny>> {
    let dtype = parse_dtype(dtype)?;
    let spec = OrthogonalSpec::new(r, d_in, seed, stream).with_gain(gain);
    let pool = thread_pool(threads)?;
    let matrix = py
        .detach(|| pool.install(|| asymlora_core::random_orthogonal(&spec, dtype)))
        .map_err(to_py)?;
    to_numpy(py, matrix, r, d_in)
}

/// Many `A`s in parallel with the GIL released; `shapes[i] = (r, d_in)`, `streams[i]`.
#[pyfunction]
#[pyo3(signature = (shapes, seed, streams, dtype = "float32", gain = 1.0, threads = None))]
fn random_orthogonal_many(
    py: Python<'_>,
    shapes: Vec<(usize, usize)>,
    seed: u64,
    streams: Vec<u64>,
    dtype: &str,
    gain: f64,
    threads: Option<usize>,
) -> PyResult<Vec<Py<PyAny>>> {
    if shapes.len() != streams.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "invalid argument `streams`: {} streams for {} shapes; give one stream id per shape",
            streams.len(),
            shapes.len()
        )));
    }
    let dtype = parse_dtype(dtype)?;
    let specs: Vec<_> = shapes
        .iter()
        .zip(&streams)
        .map(|(&(r, d_in), &stream)| OrthogonalSpec::new(r, d_in, seed, stream).with_gain(gain))
        .collect();
    let pool = thread_pool(threads)?;
    let matrices = py
        .detach(|| pool.install(|| asymlora_core::random_orthogonal_many(&specs, dtype)))
        .map_err(to_py)?;
    matrices
        .into_iter()
        .zip(shapes)
        .map(|(m, (r, d_in))| to_numpy(py, m, r, d_in))
        .collect()
}

/// The Gaussian matrix (r x d_in, float64) that `A` is computed from.
#[pyfunction]
#[pyo3(signature = (r, d_in, seed, stream = 0))]
fn gaussian_matrix<'py>(
    py: Python<'py>,
    r: usize,
    d_in: usize,
    seed: u64,
    stream: u64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let g = py.detach(|| core_gaussian(r, d_in, seed, stream));
    PyArray1::from_vec(py, g).reshape([r, d_in])
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(random_orthogonal, m)?)?;
    m.add_function(wrap_pyfunction!(random_orthogonal_many, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian_matrix, m)?)?;
    Ok(())
}
