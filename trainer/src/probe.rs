//! Feature extraction with the shared preprocessing, and the kNN probe (Euclidean, uniform
//! votes, as RedDino evaluates).

use image::RgbImage;
use reddino_models::arch::{IMAGENET_MEAN, IMAGENET_STD};
use reddino_models::preprocess::{preprocess, Normalization};
use tch::{Device, Kind, Tensor};

use crate::vit::Vit;

/// CLS features (after the final norm) of `images`, resized to the model's input size with
/// `reddino-models`' preprocessing (the function the edge uses), in batches of `batch`.
pub fn embed_images(vit: &Vit, images: &[RgbImage], device: Device, batch: usize) -> Tensor {
    let size = vit.config.img_size as u32;
    let norm = Normalization {
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
    let mut out = Vec::new();
    tch::no_grad(|| {
        for chunk in images.chunks(batch.max(1)) {
            let mut data = Vec::with_capacity(chunk.len() * 3 * (size * size) as usize);
            for img in chunk {
                data.extend(preprocess(img, size, &norm));
            }
            let x = Tensor::from_slice(&data)
                .view([chunk.len() as i64, 3, size as i64, size as i64])
                .to_device(device);
            out.push(vit.embed(&x).to_device(Device::Cpu));
        }
    });
    Tensor::cat(&out, 0)
}

/// k-nearest-neighbour accuracy (Euclidean distance, uniform votes, ties to the smaller label).
pub fn knn_accuracy(
    train: &Tensor,
    train_y: &[i64],
    test: &Tensor,
    test_y: &[i64],
    k: usize,
) -> f64 {
    let train = train.to_kind(Kind::Float);
    let test = test.to_kind(Kind::Float);
    let d = Tensor::cdist(&test, &train, 2.0, None::<i64>);
    let k = k.min(train_y.len()) as i64;
    let (_, idx) = d.topk(k, 1, false, true);
    let idx = Vec::<i64>::try_from(idx.flatten(0, -1)).expect("indices");
    let classes = train_y.iter().chain(test_y).copied().max().unwrap_or(0) as usize + 1;
    let mut correct = 0;
    for (i, &y) in test_y.iter().enumerate() {
        let mut votes = vec![0usize; classes];
        for &j in &idx[i * k as usize..(i + 1) * k as usize] {
            votes[train_y[j as usize] as usize] += 1;
        }
        let pred = (0..classes)
            .max_by_key(|&c| (votes[c], std::cmp::Reverse(c)))
            .unwrap_or(0);
        if pred as i64 == y {
            correct += 1;
        }
    }
    correct as f64 / test_y.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_on_separable_points() {
        let train = Tensor::from_slice(&[0.0f32, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0]).view([4, 2]);
        let test = Tensor::from_slice(&[0.05f32, 0.1, 4.9, 5.2, 0.2, 0.0]).view([3, 2]);
        assert_eq!(
            knn_accuracy(&train, &[0, 0, 1, 1], &test, &[0, 1, 0], 1),
            1.0
        );
        assert_eq!(
            knn_accuracy(&train, &[0, 0, 1, 1], &test, &[1, 1, 0], 1),
            2.0 / 3.0
        );
        // k = 3: two votes of the near class beat one of the far class.
        assert_eq!(
            knn_accuracy(&train, &[0, 0, 1, 1], &test, &[0, 1, 0], 3),
            1.0
        );
    }
}
