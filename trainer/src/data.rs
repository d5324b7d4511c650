//! Training images: a folder of smears cut into non-overlapping patches, or a folder of crops,
//! decoded by worker threads a few batches ahead of the training step.
//!
//! The batch of step `s` depends only on the seed and `s` (an epoch-wise permutation of the
//! patches), so a resumed run sees exactly the batches an uninterrupted one would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::bail;
use crate::error::{Context, Result};
use image::imageops::FilterType;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::DataKind;

const EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// One training sample: a patch of a file (or the whole file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub file: u32,
    pub x: u32,
    pub y: u32,
    /// The whole image, resized.
    pub whole: bool,
}

/// The indexed folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub files: Vec<PathBuf>,
    pub items: Vec<Item>,
    pub patch: u32,
    /// Files that could not be read (path and reason); they are skipped.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Image files under `dir`, recursively, sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "data folder {} does not exist or is not a folder",
            dir.display()
        );
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        let entry = entry
            .map_err(std::io::Error::from)
            .with_context(|| format!("reading {}", dir.display()))?;
        let ok = entry.file_type().is_file()
            && entry
                .path()
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                .unwrap_or(false);
        if ok {
            files.push(entry.into_path());
        }
    }
    files.sort();
    Ok(files)
}

impl Dataset {
    /// Indexes a folder. Smears give one item per full `patch x patch` tile (an image smaller
    /// than a patch gives one item, resized); crops give one item per file.
    pub fn scan(dir: &Path, kind: DataKind, patch: u32) -> Result<Dataset> {
        let all = image_files(dir)?;
        let mut files = Vec::new();
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        for path in all {
            let (w, h) = match image::image_dimensions(&path) {
                Ok(d) => d,
                Err(e) => {
                    log::warn!("skipping {}: {e}", path.display());
                    skipped.push((path, e.to_string()));
                    continue;
                }
            };
            let file = files.len() as u32;
            files.push(path);
            if kind == DataKind::Crops || w < patch || h < patch {
                items.push(Item {
                    file,
                    x: 0,
                    y: 0,
                    whole: true,
                });
                continue;
            }
            for ty in 0..h / patch {
                for tx in 0..w / patch {
                    items.push(Item {
                        file,
                        x: tx * patch,
                        y: ty * patch,
                        whole: false,
                    });
                }
            }
        }
        if items.is_empty() {
            bail!(
                "no training images in {} (looked for {} files{})",
                dir.display(),
                EXTENSIONS.join("/"),
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!("; {} unreadable", skipped.len())
                }
            );
        }
        Ok(Dataset {
            files,
            items,
            patch,
            skipped,
        })
    }

    /// Rank `rank`'s share of step `step`'s batch of `global` items over `world` ranks: the
    /// items `rank * global / world ..` of [`Dataset::batch_indices`], so every world size
    /// reads the same global batches.
    pub fn shard_indices(
        &self,
        seed: u64,
        step: usize,
        global: usize,
        rank: usize,
        world: usize,
    ) -> Vec<usize> {
        let per = global / world.max(1);
        let all = self.batch_indices(seed, step, global);
        all[rank * per..(rank + 1) * per].to_vec()
    }

    /// Item indices of step `step` for batch size `b`.
    pub fn batch_indices(&self, seed: u64, step: usize, b: usize) -> Vec<usize> {
        let n = self.items.len();
        let mut out = Vec::with_capacity(b);
        let mut cache: Option<(usize, Vec<usize>)> = None;
        for k in 0..b {
            let pos = step * b + k;
            let (epoch, i) = (pos / n, pos % n);
            if cache.as_ref().map(|c| c.0) != Some(epoch) {
                let mut perm: Vec<usize> = (0..n).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(
                    seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                perm.shuffle(&mut rng);
                cache = Some((epoch, perm));
            }
            out.push(cache.as_ref().expect("permutation").1[i]);
        }
        out
    }
}

/// Decoded images kept for patches of the same file (smears give many patches per file).
struct DecodeCache {
    map: HashMap<u32, Arc<RgbImage>>,
    order: Vec<u32>,
    cap: usize,
}

impl DecodeCache {
    fn get(&mut self, file: u32, path: &Path) -> Result<Arc<RgbImage>> {
        if let Some(img) = self.map.get(&file) {
            return Ok(img.clone());
        }
        let img = Arc::new(
            image::open(path)
                .with_context(|| format!("decoding {}", path.display()))?
                .to_rgb8(),
        );
        if self.order.len() >= self.cap {
            let old = self.order.remove(0);
            self.map.remove(&old);
        }
        self.order.push(file);
        self.map.insert(file, img.clone());
        Ok(img)
    }
}

/// The patch of one item as HWC RGB bytes.
fn load_item(ds: &Dataset, item: Item, cache: &Mutex<DecodeCache>) -> Result<Vec<u8>> {
    let path = &ds.files[item.file as usize];
    let img = {
        // Decode outside the lock when missing: check, then decode, then insert.
        let hit = cache.lock().expect("cache").map.get(&item.file).cloned();
        match hit {
            Some(i) => i,
            None => cache.lock().expect("cache").get(item.file, path)?,
        }
    };
    let p = ds.patch;
    let patch = if item.whole {
        image::imageops::resize(&*img, p, p, FilterType::Triangle)
    } else {
        image::imageops::crop_imm(&*img, item.x, item.y, p, p).to_image()
    };
    Ok(patch.into_raw())
}

/// A decoded batch: `[b, patch, patch, 3]` bytes.
pub struct RawBatch {
    pub step: usize,
    pub pixels: Vec<u8>,
    pub b: usize,
    pub patch: usize,
}

/// Decodes batches from `start` on, `prefetch` ahead, with `workers` threads.
pub struct Loader {
    rx: Receiver<Result<RawBatch>>,
    _handle: JoinHandle<()>,
}

impl Loader {
    /// Batches of `batch` items from step `start` on, for a single process.
    pub fn new(
        ds: Arc<Dataset>,
        seed: u64,
        batch: usize,
        start: usize,
        workers: usize,
        prefetch: usize,
    ) -> Loader {
        Loader::sharded(ds, seed, batch, (0, 1), start, workers, prefetch)
    }

    /// Rank `shard.0` of `shard.1`'s share of global batches of `global` items
    /// ([`Dataset::shard_indices`]).
    pub fn sharded(
        ds: Arc<Dataset>,
        seed: u64,
        global: usize,
        shard: (usize, usize),
        start: usize,
        workers: usize,
        prefetch: usize,
    ) -> Loader {
        let (rank, world) = shard;
        let batch = global / world.max(1);
        let (tx, rx) = sync_channel(prefetch.max(1));
        let cache = Arc::new(Mutex::new(DecodeCache {
            map: HashMap::new(),
            order: Vec::new(),
            cap: 64,
        }));
        let handle = std::thread::Builder::new()
            .name("data".into())
            .spawn(move || {
                let patch = ds.patch as usize;
                for step in start.. {
                    let idx = ds.shard_indices(seed, step, global, rank, world);
                    let per = patch * patch * 3;
                    let mut pixels = vec![0u8; batch * per];
                    let chunk = batch.div_ceil(workers.max(1));
                    let result: Result<()> = std::thread::scope(|s| {
                        let handles: Vec<_> = pixels
                            .chunks_mut(chunk * per)
                            .zip(idx.chunks(chunk))
                            .map(|(out, ids)| {
                                let ds = &ds;
                                let cache = &cache;
                                s.spawn(move || -> Result<()> {
                                    for (o, &i) in out.chunks_mut(per).zip(ids) {
                                        o.copy_from_slice(&load_item(ds, ds.items[i], cache)?);
                                    }
                                    Ok(())
                                })
                            })
                            .collect();
                        for h in handles {
                            h.join().expect("decoder thread")?;
                        }
                        Ok(())
                    });
                    let msg = result.map(|_| RawBatch {
                        step,
                        pixels,
                        b: batch,
                        patch,
                    });
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawn data thread");
        Loader {
            rx,
            _handle: handle,
        }
    }

    /// The next batch, in step order.
    pub fn next(&self) -> Result<RawBatch> {
        self.rx.recv().ok().context("data loader stopped")?
    }
}

/// Bytes `[b, p, p, 3]` -> float tensor `[b, 3, p, p]` in [0, 1] on `device`.
pub fn to_tensor(raw: &RawBatch, device: tch::Device) -> tch::Tensor {
    let p = raw.patch as i64;
    tch::Tensor::from_slice(&raw.pixels)
        .view([raw.b as i64, p, p, 3])
        .to_device(device)
        .permute([0, 3, 1, 2])
        .to_kind(tch::Kind::Float)
        / 255.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_and_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        RgbImage::from_pixel(500, 300, image::Rgb([10, 20, 30]))
            .save(sub.join("s1.png"))
            .unwrap();
        RgbImage::from_pixel(100, 100, image::Rgb([1, 2, 3]))
            .save(dir.path().join("small.bmp"))
            .unwrap();
        std::fs::write(dir.path().join("broken.jpg"), b"not a jpeg").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let ds = Dataset::scan(dir.path(), DataKind::Smears, 224).unwrap();
        // 500x300 -> 2x1 patches; the small image -> 1 whole item; the broken file skipped.
        assert_eq!(ds.items.len(), 3);
        assert_eq!(ds.skipped.len(), 1);
        // Every epoch is a permutation; different epochs differ in order (usually).
        let e0 = ds.batch_indices(1, 0, 3);
        let mut s = e0.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2]);
        assert_eq!(ds.batch_indices(1, 0, 3), e0, "deterministic");
        let loader = Loader::new(Arc::new(ds), 1, 2, 5, 2, 2);
        let b = loader.next().unwrap();
        assert_eq!((b.step, b.b, b.pixels.len()), (5, 2, 2 * 224 * 224 * 3));
        assert_eq!(loader.next().unwrap().step, 6);
        let t = to_tensor(&b, tch::Device::Cpu);
        assert_eq!(t.size(), vec![2, 3, 224, 224]);
        let empty = tempfile::tempdir().unwrap();
        let err = Dataset::scan(empty.path(), DataKind::Smears, 224)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no training images"), "{err}");
    }
}
