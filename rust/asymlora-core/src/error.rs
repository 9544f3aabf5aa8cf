//! One error type for the core; the Python binding maps each variant to a typed exception.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed a value outside the documented domain (maps to `ValueError`).
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument { name: &'static str, message: String },

    /// An adapter file or config is malformed; `location` names the module and/or field.
    #[error("{path}: {location}: {message}")]
    AdapterFormat {
        path: String,
        location: String,
        message: String,
    },

    /// A file is not a valid safetensors file (bad header, offsets, sizes).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: String, message: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            message: message.into(),
        }
    }

    pub fn safetensors(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        Error::Safetensors {
            path: path.as_ref().display().to_string(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
