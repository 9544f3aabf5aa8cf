//! Helpers shared by the integration tests: a seeded number source and safetensors
//! files written from f64 values (each test crate uses a subset of them).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use asymlora_core::adapter::OwnedTensor;
use asymlora_core::io::write_safetensors;
use asymlora_core::{Dtype, Matrix};
use safetensors::Dtype as St;

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Values rounded once to `dtype` and their little-endian bytes.
pub fn encode(dtype: St, values: &[f64]) -> Vec<u8> {
    match dtype {
        St::F64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        St::F32 => Matrix::round_from_f64(values, Dtype::F32).to_le_bytes(),
        St::F16 => Matrix::round_from_f64(values, Dtype::F16).to_le_bytes(),
        St::BF16 => Matrix::round_from_f64(values, Dtype::BF16).to_le_bytes(),
        other => panic!("no float {other:?}"),
    }
}

pub fn decode(dtype: St, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        St::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        St::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        St::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        St::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        other => panic!("no float {other:?}"),
    }
}

/// `x` rounded once to `dtype` (the crate's rounding is checked against exact
/// rounding in its own tests).
pub fn round_to(dtype: St, x: &[f64]) -> Vec<f64> {
    decode(dtype, &encode(dtype, x))
}

pub fn tensor(name: &str, dtype: St, shape: &[usize], values: &[f64]) -> (String, OwnedTensor) {
    let t = OwnedTensor::new(name, dtype, shape.to_vec(), encode(dtype, values)).unwrap();
    (name.to_string(), t)
}

pub fn raw(name: &str, dtype: St, shape: &[usize], data: Vec<u8>) -> (String, OwnedTensor) {
    (
        name.to_string(),
        OwnedTensor::new(name, dtype, shape.to_vec(), data).unwrap(),
    )
}

pub fn write(path: &Path, tensors: Vec<(String, OwnedTensor)>) {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(path, &tensors.into_iter().collect(), &meta).unwrap();
}
