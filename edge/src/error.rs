//! The error of the edge's commands and wiring (`run`, `demo`, `analyze`, the data-set tools):
//! each stage's own error passes through unchanged, and what only the wiring can get wrong
//! (a file it could not read or write, a request it refuses) is said here. [`Error::exit_code`]
//! is the binary's one exit status.

use std::path::PathBuf;

use crate::capture::CaptureError;
use crate::cells::ProfileError;
use crate::config::ConfigError;
use crate::offline::import::ImportError;
use crate::offline::labelled::LabelError;
use crate::pipeline::CommandError;
use crate::publish::mqtt::SettingsError;
use crate::publish::outbox::OutboxError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Mqtt(#[from] SettingsError),
    /// An inference backend that could not be opened (library, provider, engine build).
    #[error(transparent)]
    Backend(#[from] crate::infer::BackendError),
    /// A bundle refused or a model that failed (signature, hashes, self-test, inference).
    #[error(transparent)]
    Model(#[from] reddino_models::Error),
    #[error("analysing {}: {source}", image.display())]
    Analyze {
        image: PathBuf,
        source: reddino_models::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Arguments or settings that cannot work together; says what to give instead.
    #[error("{0}")]
    Usage(String),
    /// Work that ran and did not succeed (a broker that did not start, results not delivered).
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A file operation that failed: `what` says which ("creating", "writing", ...).
    pub fn file(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File {
            what,
            path: path.into(),
            source,
        }
    }

    /// The process exit status for this error: 2 for a bad config or bad arguments (fix the
    /// input and run again), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) | Error::Profile(_) | Error::Mqtt(_) => 2,
            Error::Backend(e) if e.is_setup() => 2,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::FinderArgs;

    #[test]
    fn bad_input_exits_2_and_failures_1() {
        let usage = Error::Usage("give exactly one of --points, --voc, --coco or --crops".into());
        assert_eq!(usage.exit_code(), 2);
        let profile: Error = crate::cells::CellFinderConfig::profile("fancy")
            .unwrap_err()
            .into();
        assert_eq!(profile.exit_code(), 2);
        assert!(profile.to_string().contains("known: default, real-smear"));
        assert_eq!(Error::Failed("broker".into()).exit_code(), 1);
        let file = Error::file(
            "writing",
            "/nowhere/x",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(file.exit_code(), 1);
        assert!(file.to_string().starts_with("writing /nowhere/x: "));
    }

    #[test]
    fn finder_arguments_are_checked() {
        let args = |profile: &str, settings: Option<&str>| FinderArgs {
            profile: profile.into(),
            settings: settings.map(String::from),
        };
        assert!(args("real-smear", None).config().is_ok());
        assert!(matches!(
            args("nope", None).config(),
            Err(Error::Profile(_))
        ));
        let e = args("default", Some("no_such_setting = 1"))
            .config()
            .unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{e}");
        assert!(e.to_string().starts_with("finder settings: "), "{e}");
    }
}
