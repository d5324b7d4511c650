//! Feature extraction with the shared preprocessing (the kNN and linear probes on the features
//! are in [`crate::eval`]).

use image::RgbImage;
use reddino_models::arch::{IMAGENET_MEAN, IMAGENET_STD};
use reddino_models::preprocess::{preprocess_into, Normalization};
use tch::{Device, Tensor};

use crate::vit::Vit;

/// CLS features (after the final norm) of `images`, resized to the model's input size with
/// `reddino-models`' preprocessing (the function the edge uses), in batches of `batch`.
pub fn embed_images(vit: &Vit, images: &[RgbImage], device: Device, batch: usize) -> Tensor {
    let size = vit.config.img_size;
    let mut out = Vec::new();
    tch::no_grad(|| {
        for chunk in images.chunks(batch.max(1)) {
            out.push(
                vit.embed(&input_batch(chunk, size, device))
                    .to_device(Device::Cpu),
            );
        }
    });
    Tensor::cat(&out, 0)
}

/// The model's input for `images`: `[N, 3, size, size]` on `device`, each image resized and
/// normalised with `reddino-models`' preprocessing (the function the edge uses).
pub fn input_batch(images: &[RgbImage], size: usize, device: Device) -> Tensor {
    let norm = Normalization {
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
    let plane = 3 * size * size;
    let mut data = vec![0f32; images.len() * plane];
    for (img, out) in images.iter().zip(data.chunks_exact_mut(plane)) {
        preprocess_into(img, size as u32, &norm, out);
    }
    Tensor::from_slice(&data)
        .view([images.len() as i64, 3, size as i64, size as i64])
        .to_device(device)
}
