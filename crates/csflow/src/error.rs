use std::path::PathBuf;

/// Everything that can go wrong in the library; messages name the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    #[error("{0}")]
    Invalid(String),

    #[error("training stopped: {0}")]
    Diverged(String),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    /// Attaches `path` to an error that does not name a file yet (shape mismatches, tensor errors).
    pub fn at(self, path: &std::path::Path) -> Self {
        match self {
            Error::Invalid(m) => Error::format(path, m),
            Error::Tensor(e) => Error::format(path, e.to_string()),
            e => e,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
