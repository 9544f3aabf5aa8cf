//! asymlora core: everything that does not need Python.
//!
//! * [`prng`] — the counter-based Gaussian source behind generator `haar-v1`.
//! * [`householder`] — deterministic thin QR with the Haar sign fix.
//! * [`orthogonal`] — seeded random-orthogonal `A` factors (single and batched).
//! * [`dtype`] — the output dtypes and their one-time rounding from `f64`.
//! * [`io`] — safetensors files: mapped reading, atomic writing with reproducible bytes.
//! * [`adapter`] — the seed-plus-B adapter file format v1 (read, validate, write, inspect).
//! * [`peft`] — PEFT LoRA adapter directories: the one reader, PEFT's pattern rule, import.
//! * [`combine`] — exact adapter algebra: several adapters combined into one (weighted sum of updates).
//! * [`merge`] — offline, streaming merge of adapters (ours or PEFT's) into safetensors checkpoints.

pub mod adapter;
pub mod combine;
pub mod dtype;
pub mod error;
pub mod householder;
pub mod io;
pub mod merge;
pub mod orthogonal;
pub mod peft;
pub mod prng;
mod source;

pub use dtype::{Dtype, Matrix};
pub use error::{Error, Result};
pub use orthogonal::{random_orthogonal, random_orthogonal_many, Generator, OrthogonalSpec};
