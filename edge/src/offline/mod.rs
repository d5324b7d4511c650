//! What runs on files rather than a camera: [`analyze`] (image files to counts), the data-set
//! tools ([`labelled`] readers, [`import`] to training crops, [`quality`] of the finder,
//! [`synth_crops`] from the synthetic microscope) and the [`demo`].

pub mod analyze;
pub mod demo;
pub mod import;
pub mod labelled;
pub mod quality;
pub mod synth_crops;

use crate::cells::CellFinderConfig;
use crate::error::{Error, Result};

/// The cell finder a data-set tool runs (`import`, `finder-quality`): a profile and settings
/// over it.
#[derive(clap::Args, Debug, Clone)]
pub struct FinderArgs {
    /// Finder profile: `real-smear` or `default` (the synthetic microscope's).
    #[arg(long, default_value = "real-smear")]
    pub profile: String,
    /// Finder settings over the profile's (`CellFinderConfig` fields in TOML, e.g.
    /// 'split_necks = 0').
    #[arg(long)]
    pub settings: Option<String>,
}

impl FinderArgs {
    pub fn config(&self) -> Result<CellFinderConfig> {
        let cfg = CellFinderConfig::profile(&self.profile)?;
        match &self.settings {
            Some(s) => cfg
                .with_settings(s)
                .map_err(|e| Error::Usage(format!("finder settings: {e}"))),
            None => Ok(cfg),
        }
    }
}
