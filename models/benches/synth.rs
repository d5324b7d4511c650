//! Synthetic field rendering speed: `cargo bench -p reddino-models --bench synth`.
//! Target: a 1920x1080 field in under a second (release build, one thread).

use std::time::Instant;

use reddino_models::synth::{render, FieldSpec, SourcePreset};

fn main() {
    // Under the test command (REDDINO_BENCH_SMOKE) one repetition only checks that it runs.
    let reps: usize = if std::env::var_os("REDDINO_BENCH_SMOKE").is_some() {
        1
    } else {
        5
    };
    println!("| source | size | cells | p50 ms | max ms | target < 1000 ms |");
    println!("|---|---|---|---|---|---|");
    for source in SourcePreset::all() {
        for (w, h) in [(1280u32, 960u32), (1920, 1080)] {
            let mut times = Vec::with_capacity(reps);
            let mut cells = 0;
            for seed in 0..reps as u64 {
                let spec = FieldSpec::new(w, h, seed, source.clone());
                let t = Instant::now();
                let f = render(&spec).expect("render");
                times.push(t.elapsed().as_secs_f64() * 1e3);
                cells = f.cells.len();
            }
            times.sort_by(|a, b| a.total_cmp(b));
            let p50 = times[times.len() / 2];
            let max = times[times.len() - 1];
            println!(
                "| {} | {w}x{h} | {cells} | {p50:.0} | {max:.0} | {} |",
                source.name,
                if max < 1000.0 { "met" } else { "NOT met" }
            );
        }
    }
}
