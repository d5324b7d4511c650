//! Synthetic training data from `reddino-models`' smear renderer.

use std::path::Path;

use crate::error::{Context, Result};
use reddino_models::synth::{render, FieldSpec, SourcePreset};

/// Writes `per_source` fields of every acquisition source as PNG under `out/{source}/`.
/// Returns the number of files.
pub fn write_smears(
    out: &Path,
    per_source: usize,
    width: u32,
    height: u32,
    seed: u64,
) -> Result<usize> {
    let mut n = 0;
    for (si, source) in SourcePreset::all().into_iter().enumerate() {
        let dir = out.join(&source.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for i in 0..per_source {
            let spec = FieldSpec::new(
                width,
                height,
                seed * 1_000_003 + (si * 10_007 + i) as u64,
                source.clone(),
            );
            let field = render(&spec)?;
            let path = dir.join(format!("field_{i:04}.png"));
            field
                .image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            n += 1;
        }
    }
    Ok(n)
}
