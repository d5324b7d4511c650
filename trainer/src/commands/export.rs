//! `reddino-trainer export`.

use std::path::PathBuf;

use crate::error::{Context, Result};
use reddino_models::bundle::NewBundle;

/// Export a backbone (+ optional linear head) to a signed bundle for reddino-edge; the ONNX
/// is checked against the tch model (max difference 1e-4) before anything is written.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Backbone safetensors: this trainer's backbone.safetensors, or a timm / DINOv2 /
    /// RedDino checkpoint (detected from the keys).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Linear head safetensors (with its class names).
    #[arg(long)]
    pub head: Option<PathBuf>,
    /// Model input size (a multiple of 14); the position embedding is resampled.
    #[arg(long, default_value_t = 224)]
    pub input_size: usize,
    /// Bundle directory to write; `--tar` also packs it.
    #[arg(long)]
    pub out: PathBuf,
    /// Minisign secret key (reddino-models keygen makes one).
    #[arg(long)]
    pub sign: PathBuf,
    #[arg(long, default_value = "reddino")]
    pub name: String,
    #[arg(long, default_value = "0.1.0")]
    pub version: String,
    #[arg(long, default_value = "")]
    pub description: String,
    /// The crops the model was trained on: none smaller than this multiple of the frame's
    /// median cell (`--min-side` of the crop tools); 0 = each crop scaled to its cell.
    #[arg(long, default_value_t = 0.0)]
    pub crop_min_side: f32,
    /// The crops the model was trained on were cut at this multiple of the cell's box
    /// (`reddino-edge import --margin`); the edge then cuts at it whatever its own
    /// `analysis.margin`. 0 = the device's margin (1.3 unless configured).
    #[arg(long, default_value_t = 0.0)]
    pub crop_margin: f32,
    /// The crops the model was trained on had their neighbours blanked out
    /// (`--blank-neighbours` of the crop tools); the edge then cuts them so too.
    #[arg(long)]
    pub blank_neighbours: bool,
    /// The edge's cell-finder profile the training crops were cut with (`reddino-edge
    /// import --profile`): `real-smear` for real fields; default: the synthetic microscope's.
    #[arg(long, default_value = "")]
    pub cell_finder: String,
    #[arg(long)]
    pub tar: bool,
    /// The graph averages each crop's logits over this many turned and mirrored copies of it:
    /// 1 (the crop alone), 4 (its quarter turns) or 8 (those and their mirror images); the
    /// model costs that many times as much (the manifest's `test_time_views`).
    #[arg(long, default_value_t = 1)]
    pub test_time_views: usize,
}

/// Runs `reddino-trainer export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let input_size = args.input_size;
    let w = reddino_models::weights::VitWeights::load(&args.checkpoint)?;
    let head = args
        .head
        .as_ref()
        .map(|p| -> Result<_> {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(reddino_models::weights::LinearHead::from_bytes(
                &bytes,
                &p.display().to_string(),
            )?)
        })
        .transpose()?;
    let key = reddino_models::bundle::SigningKey::from_file(&args.sign, None)?;
    let (m, diff) = crate::export::export(
        &crate::export::ExportSpec {
            bundle: NewBundle {
                crop_min_side: args.crop_min_side,
                crop_margin: args.crop_margin,
                blank_neighbours: args.blank_neighbours,
                cell_finder: args.cell_finder,
                test_time_views: args.test_time_views,
                ..NewBundle::new(args.name, args.version, args.description, &w, head.as_ref())
            },
            input_size,
        },
        &key,
        &args.out,
    )?;
    println!(
        "{}: {} {} (ViT {}-d x {}, input {input_size}, {} classes); ONNX vs tch max diff {diff:.1e}",
        args.out.display(),
        m.name,
        m.version,
        w.config.embed_dim,
        w.config.depth,
        m.class_names.len()
    );
    if args.tar {
        // OUT.tar beside OUT (not `with_extension`, which would turn `rbc-2.1.0` into
        // `rbc-2.1.tar`).
        let mut t = args.out.clone().into_os_string();
        t.push(".tar");
        let t = PathBuf::from(t);
        reddino_models::bundle::pack(&args.out, &t)?;
        println!("{}", t.display());
    }
    Ok(())
}
