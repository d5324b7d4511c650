//! Cell-finding recall and precision per synthetic source:
//! `cargo run --release -p reddino-edge --example cells_quality [FIELDS_PER_SOURCE] [SETTINGS]`,
//! SETTINGS being `CellFinderConfig` fields in TOML, e.g. `'split_necks = 0'`.

use std::time::Instant;

use reddino_edge::cells::{find, match_centres, CellFinderConfig};
use reddino_models::synth::{render, FieldSpec, SourcePreset};

fn main() {
    let fields: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let cfg: CellFinderConfig = match std::env::args().nth(2) {
        Some(settings) => toml::from_str(&settings).unwrap_or_else(|e| {
            eprintln!("finder settings: {e}");
            std::process::exit(2)
        }),
        None => CellFinderConfig::default(),
    };
    println!("| source | fields | cells | recall | precision | ms per 1280x960 field |");
    println!("|---|---|---|---|---|---|");
    for source in SourcePreset::all() {
        let (mut tp, mut det, mut truth, mut ms) = (0, 0, 0, 0.0);
        for seed in 0..fields {
            let field =
                render(&FieldSpec::new(1280, 960, 1000 + seed, source.clone())).expect("render");
            let t = Instant::now();
            let found: Vec<(f32, f32)> =
                find(&field.image, &cfg).iter().map(|c| c.center).collect();
            ms += t.elapsed().as_secs_f64() * 1e3;
            let gt: Vec<((f32, f32), f32)> =
                field.cells.iter().map(|c| (c.center, c.radius)).collect();
            let m = match_centres(&found, &gt);
            tp += m.true_positives;
            det += m.detections;
            truth += m.truths;
        }
        println!(
            "| {} | {fields} | {truth} | {:.4} | {:.4} | {:.0} |",
            source.name,
            tp as f64 / truth as f64,
            tp as f64 / det as f64,
            ms / fields as f64
        );
    }
}
