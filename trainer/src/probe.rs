//! Feature extraction with the shared preprocessing (the kNN and linear probes on the features
//! are in [`crate::eval`]).

use image::RgbImage;
use reddino_models::arch::{IMAGENET_MEAN, IMAGENET_STD};
use reddino_models::preprocess::{preprocess, Normalization};
use tch::{Device, Tensor};

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
