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

    /// An adapter does not fit a base checkpoint (missing module, shape, dtype,
    /// conflicting tensors); `message` lists the first problems. Nothing was written.
    #[error("{message}")]
    Mismatch { message: String },

    /// A model checkpoint (file, shard set or index) is unusable as a merge base.
    #[error("{path}: {message}")]
    Checkpoint { path: String, message: String },

    /// NaN or infinite values where finite ones are required (adapter factors, or a
    /// merged weight that overflowed its dtype).
    #[error("{message}")]
    NonFinite { message: String },

    /// The output exists and replacing it was not asked for (or is refused).
    #[error("{}: {message}", path.display())]
    Exists { path: PathBuf, message: String },

    /// The caller asked to stop (Ctrl-C); everything written so far was removed.
    #[error("interrupted; nothing was written")]
    Cancelled,

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// At most this many problems are listed in one error message.
pub(crate) const SHOWN_PROBLEMS: usize = 10;

/// The first [`SHOWN_PROBLEMS`] problems on one line (errors are one line: a log line,
/// a CLI line), each after a space and separated by `;`, and how many more there are.
pub(crate) fn problem_list(problems: &[String]) -> String {
    let mut text = format!(" {}", problems[..problems.len().min(SHOWN_PROBLEMS)].join("; "));
    if problems.len() > SHOWN_PROBLEMS {
        text.push_str(&format!("; and {} more", problems.len() - SHOWN_PROBLEMS));
    }
    text
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

    pub fn checkpoint(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().display().to_string(),
            message: message.into(),
        }
    }

    /// `path` does not exist (a `FileNotFoundError` in Python).
    pub fn not_found(path: impl Into<PathBuf>) -> Self {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "does not exist"),
        )
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
