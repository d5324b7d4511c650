use reddino_edge::cells::{find, match_centres, CellFinderConfig};
use reddino_models::synth::{render, FieldSpec, SourcePreset};
fn main() {
    let split: f32 = std::env::args().nth(1).unwrap().parse().unwrap();
    let nw: f32 = std::env::args().nth(2).unwrap().parse().unwrap();
    let cfg = CellFinderConfig {
        split_dynamics: split,
        noise_widths: nw,
        ..Default::default()
    };
    for source in SourcePreset::all() {
        let (mut tp, mut d, mut t) = (0, 0, 0);
        for seed in 0..2 {
            let field = render(&FieldSpec::new(1280, 960, 100 + seed, source.clone())).unwrap();
            let found: Vec<(f32, f32)> =
                find(&field.image, &cfg).iter().map(|c| c.center).collect();
            let truth: Vec<((f32, f32), f32)> =
                field.cells.iter().map(|c| (c.center, c.radius)).collect();
            let r = match_centres(&found, &truth);
            tp += r.true_positives;
            d += r.detections;
            t += r.truths;
        }
        println!(
            "{split} {nw} {}: recall {:.4} precision {:.4}",
            source.name,
            tp as f64 / t as f64,
            tp as f64 / d as f64
        );
    }
}
