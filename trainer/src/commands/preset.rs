//! `reddino-trainer preset`.

use crate::error::Result;

use crate::config::Config;

/// Print a preset (s, b, l, tiny) as a complete TOML config.
#[derive(clap::Args)]
pub struct PresetArgs {
    pub name: String,
}

/// Runs `reddino-trainer preset`.
pub fn run(args: PresetArgs) -> Result<()> {
    let PresetArgs { name } = args;
    print!("{}", toml::to_string_pretty(&Config::preset(&name)?)?);
    Ok(())
}
