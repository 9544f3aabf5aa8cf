//! Helpers shared by the integration tests: a seeded number source and safetensors
//! files written from f64 values (each test crate uses a subset of them).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use asymlora_core::adapter::OwnedTensor;
use asymlora_core::dtype::{decode_float, encode_float};
use asymlora_core::io::write_safetensors;
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
    encode_float(dtype, values).expect("a float dtype")
}

pub fn decode(dtype: St, bytes: &[u8]) -> Vec<f64> {
    decode_float(dtype, bytes).expect("a float dtype")
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
