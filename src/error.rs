//! The one error type of kdgraph: a kind a caller can match, and a one-line message that names the
//! file, node or tensor and says what to do.

use std::fmt;

/// Who has to act, and how: the kind decides the exit code; the message says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad command-line arguments or options (exit code 2).
    Usage,
    /// A file that cannot be read or written (exit code 1).
    Io,
    /// A model, tensor or graph that is broken or inconsistent (exit code 1).
    InvalidModel,
    /// A valid model that kdgraph or a runtime it writes for cannot handle (exit code 1).
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Usage, message)
    }

    pub fn io(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Io, message)
    }

    pub fn invalid_model(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidModel, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// The process exit code a command line should end with.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            ErrorKind::Io | ErrorKind::InvalidModel | ErrorKind::Unsupported => 1,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
