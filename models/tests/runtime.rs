//! The tract runtime's batching: chunks, threads side by side and short batches give what
//! one image at a time gives.

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::onnx;
use reddino_models::runtime::{TractModel, MAX_CHUNK};
use reddino_models::weights::{LinearHead, Tensor, VitWeights};

const SIZE: usize = 28;

fn model_bytes() -> Vec<u8> {
    model_bytes_with_views(1)
}

fn model_bytes_with_views(views: usize) -> Vec<u8> {
    let cfg = VitConfig::preset(Preset::Tiny, SIZE).unwrap();
    let w = VitWeights::random(&cfg, 3, 0.5).unwrap();
    let (c, d) = (4, cfg.embed_dim);
    let head = LinearHead {
        class_names: (0..c).map(|i| format!("c{i}")).collect(),
        weight: Tensor::new(
            vec![c, d],
            (0..c * d).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect(),
        ),
        bias: Tensor::new(vec![c], vec![0.1, -0.2, 0.3, 0.0]),
        size: None,
    };
    onnx::export_with_views(&w, Some(&head), views).unwrap()
}

/// Image `i` of `[n, 3, S, S]` turned `k % 4` quarter turns counter-clockwise
/// (`torch.rot90(x, k, [2, 3])`) and mirrored left to right when `k >= 4`.
fn view_of(img: &[f32], k: usize) -> Vec<f32> {
    let s = SIZE;
    let mut cur = img.to_vec();
    for _ in 0..k % 4 {
        // rot90 by one: out[i][j] = in[j][s - 1 - i].
        let mut next = vec![0f32; cur.len()];
        for c in 0..3 {
            for i in 0..s {
                for j in 0..s {
                    next[c * s * s + i * s + j] = cur[c * s * s + j * s + (s - 1 - i)];
                }
            }
        }
        cur = next;
    }
    if k >= 4 {
        for row in cur.chunks_mut(s) {
            row.reverse();
        }
    }
    cur
}

/// A graph with test-time views gives the crop's own embedding and the mean of the plain
/// graph's logits over the turned and mirrored crops.
#[test]
fn test_time_views_average_the_logits_of_the_turned_crops() {
    let per = 3 * SIZE * SIZE;
    let plain = TractModel::new(&model_bytes(), 1, SIZE).unwrap();
    let x = images(3);
    for views in [4, 8] {
        let m = TractModel::with_threads(&model_bytes_with_views(views), 3, SIZE, 2).unwrap();
        let o = m.run(&x).unwrap();
        let logits = o.logits.unwrap();
        for (i, img) in x.chunks(per).enumerate() {
            let own = plain.run(img).unwrap();
            assert!(max_diff(&o.embedding[i * 192..(i + 1) * 192], &own.embedding) < 1e-4);
            let mut mean = vec![0f32; 4];
            for k in 0..views {
                let l = plain.run(&view_of(img, k)).unwrap().logits.unwrap();
                for (m, v) in mean.iter_mut().zip(l) {
                    *m += v / views as f32;
                }
            }
            let got = &logits[i * 4..(i + 1) * 4];
            assert!(
                max_diff(got, &mean) < 1e-4,
                "{views} views: {got:?} vs {mean:?}"
            );
            // The views matter: the crop alone reads otherwise.
            assert!(max_diff(got, &own.logits.unwrap()) > 1e-3);
        }
    }
    let cfg = VitConfig::preset(Preset::Tiny, SIZE).unwrap();
    let w = VitWeights::random(&cfg, 3, 0.5).unwrap();
    for bad in [0, 2, 3, 9] {
        let e = onnx::export_with_views(&w, None, bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("test-time views"), "{e}");
    }
    let e = onnx::export_with_views(&w, None, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("give the head"), "{e}");
}

fn images(n: usize) -> Vec<f32> {
    (0..n * 3 * SIZE * SIZE)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn chunks_and_threads_match_single_images() {
    let bytes = model_bytes();
    let per = 3 * SIZE * SIZE;
    let one = TractModel::new(&bytes, 1, SIZE).unwrap();
    let n = 2 * MAX_CHUNK + 3;
    let x = images(n);
    let (mut emb, mut logits) = (Vec::new(), Vec::new());
    for img in x.chunks(per) {
        let o = one.run(img).unwrap();
        emb.extend(o.embedding);
        logits.extend(o.logits.unwrap());
    }
    // (batch, threads): one chunk; two chunks on two threads; three chunks of MAX_CHUNK on
    // two threads; a batch larger than the images given (a short batch).
    for (batch, threads) in [(n, 1), (5, 2), (n, 2), (n + 4, 2)] {
        let m = TractModel::with_threads(&bytes, batch, SIZE, threads).unwrap();
        let (mut e, mut l) = (Vec::new(), Vec::new());
        for part in x.chunks(batch * per) {
            let o = m.run(part).unwrap();
            assert_eq!(o.embedding.len(), part.len() / per * m.embed_dim());
            e.extend(o.embedding);
            l.extend(o.logits.unwrap());
        }
        let (de, dl) = (max_diff(&e, &emb), max_diff(&l, &logits));
        assert!(
            de < 1e-4 && dl < 1e-4,
            "batch {batch}, {threads} threads: {de} {dl}"
        );
    }
}

#[test]
fn wrong_input_lengths_are_refused() {
    let m = TractModel::with_threads(&model_bytes(), 4, SIZE, 2).unwrap();
    let per = 3 * SIZE * SIZE;
    for len in [0, per - 1, 5 * per, 2 * per + 3] {
        let e = m.run(&vec![0.0; len]).unwrap_err().to_string();
        assert!(e.contains("expected 1 to 4 images"), "{len}: {e}");
    }
}
