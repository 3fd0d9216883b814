//! The one error type of kdgraph: a one-line message that names the file, node or tensor and says what to do.

use std::fmt;

/// What went wrong, split by who has to act: the caller's arguments (usage) or the models (input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bad command-line arguments or options; exit code 2.
    Usage(String),
    /// A model, file or tensor that cannot be used as given; exit code 1.
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }

    pub fn input(message: impl Into<String>) -> Self {
        Error::Input(message.into())
    }

    /// The process exit code a command line should end with.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            Error::Input(_) => 1,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::Usage(m) | Error::Input(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}
