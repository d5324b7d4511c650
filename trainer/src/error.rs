//! The trainer's one error type: what went wrong in a run, an evaluation or an export, with
//! the file, setting or step it concerns. Each variant's message carries its cause, so one
//! line (`{err}`) says everything; `reddino-trainer` prints it and exits 1.
//!
//! [`Context`] adds what was being done to an error (`reading FILE`, `config FILE`), and
//! [`bail!`](crate::bail) refuses with a message, the way the library's functions report bad
//! input.

use std::fmt::Display;

/// A trainer error. Library functions return [`Result`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input or settings: a config key, an argument, a data set the run cannot use.
    #[error("{0}")]
    Invalid(String),
    /// A file or folder could not be read, written or listed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An image could not be decoded or encoded.
    #[error("{0}")]
    Image(#[from] image::ImageError),
    /// libtorch refused an operation (shapes, devices, a missing tensor in a checkpoint).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The shared contract refused something (bundle, weights, ONNX, preprocessing).
    #[error("{0}")]
    Model(#[from] reddino_models::Error),
    /// A JSON file (state, report, metrics) could not be read or written.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A config that is not valid TOML or does not fit the config's types.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A config could not be written as TOML.
    #[error("{0}")]
    TomlWrite(#[from] toml::ser::Error),
    /// A plot could not be drawn.
    #[error("drawing a plot: {0}")]
    Plot(String),
    /// What was being done when `source` happened.
    #[error("{context}: {source}")]
    Context { context: String, source: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Says what was being done when an error happened (`reading FILE`), or turns a missing value
/// into an error that says what is missing.
pub trait Context<T> {
    fn context<C: Display>(self, context: C) -> Result<T>;
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.to_string(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(context.to_string()))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(f().to_string()))
    }
}

/// Returns an [`Error::Invalid`] with a formatted message.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_says_what_was_done_and_why() {
        let io = std::fs::read("/nonexistent/reddino/state.json");
        let e = io
            .context("reading /nonexistent/reddino/state.json")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("reading /nonexistent/reddino/state.json: "),
            "{msg}"
        );
        assert!(matches!(e, Error::Context { ref source, .. } if matches!(**source, Error::Io(_))));
        let none: Option<u8> = None;
        assert_eq!(none.context("no `x`").unwrap_err().to_string(), "no `x`");
        let f = || -> Result<()> { crate::bail!("k must be >= {}, got {}", 2, 1) };
        assert_eq!(f().unwrap_err().to_string(), "k must be >= 2, got 1");
    }
}
