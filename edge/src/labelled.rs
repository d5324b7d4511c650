//! Labelled fields as users have them: an `images/` folder and a `labels/` folder of
//! point-label files (`x y class` per line, one labelled cell each, the layout of Chula RBC-12),
//! read and checked, and split by field. A field without a label file has no labels. Every
//! refusal names the file and the line: a malformed line, a label outside its image, an
//! unknown class id, a label file without its image.

use std::path::{Path, PathBuf};

/// A labelled cell: its centre in pixels and its class id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointLabel {
    pub x: f32,
    pub y: f32,
    pub class: u32,
}

/// One field: its image file and its point labels (empty when it has no label file).
#[derive(Debug, Clone)]
pub struct Field {
    /// The image's file stem (`17` for `images/17.jpg`).
    pub name: String,
    pub image: PathBuf,
    /// The label file, when the field has one.
    pub labels_file: Option<PathBuf>,
}

/// Why a labelled data set was refused.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: malformed label line {text:?}: {why}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        text: String,
        why: &'static str,
    },
    #[error(
        "{}:{line}: label at ({x}, {y}) lies outside its {width}x{height} image",
        path.display()
    )]
    Outside {
        path: PathBuf,
        line: usize,
        x: f32,
        y: f32,
        width: u32,
        height: u32,
    },
    #[error("{}:{line}: unknown class id {class} (the data set has {classes} classes: 0-{})", path.display(), classes.saturating_sub(1))]
    UnknownClass {
        path: PathBuf,
        line: usize,
        class: u32,
        classes: usize,
    },
    #[error("{}: label file has no image (looked for {} with a png, jpg, jpeg, bmp or tif extension)", labels.display(), stem.display())]
    MissingImage { labels: PathBuf, stem: PathBuf },
    #[error("{}: cannot decode image: {why}", path.display())]
    Image { path: PathBuf, why: String },
    #[error("{}: not a labelled data set: {why}", path.display())]
    Layout { path: PathBuf, why: String },
}

const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// The fields of a point-labelled data set `dir` (`dir/images/*`, `dir/labels/*.txt`), sorted
/// by name (numerically where names are numbers). A label file without its image is refused.
pub fn point_fields(dir: &Path) -> Result<Vec<Field>, LabelError> {
    let images = dir.join("images");
    let labels = dir.join("labels");
    if !images.is_dir() {
        return Err(LabelError::Layout {
            path: dir.to_path_buf(),
            why: format!("no images/ folder ({})", images.display()),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LabelError::Io { path, source }
    };
    let mut fields = Vec::new();
    for entry in std::fs::read_dir(&images).map_err(io(&images))? {
        let path = entry.map_err(io(&images))?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if !ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(String::from) else {
            continue;
        };
        let lf = labels.join(format!("{name}.txt"));
        fields.push(Field {
            labels_file: lf.is_file().then_some(lf),
            name,
            image: path,
        });
    }
    if labels.is_dir() {
        for entry in std::fs::read_dir(&labels).map_err(io(&labels))? {
            let path = entry.map_err(io(&labels))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("txt") {
                continue;
            }
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if !fields.iter().any(|f| f.name == stem) {
                return Err(LabelError::MissingImage {
                    stem: images.join(stem),
                    labels: path,
                });
            }
        }
    }
    fields.sort_by_key(|f| natural_key(&f.name));
    Ok(fields)
}

fn natural_key(name: &str) -> (u64, String) {
    (name.parse().unwrap_or(u64::MAX), name.to_string())
}

/// Parses point labels (`x y class` per line; blank lines and `#` comments skipped) of an image
/// of `width` x `height` with `classes` class ids. `path` names the file in errors.
pub fn parse_points(
    text: &str,
    path: &Path,
    width: u32,
    height: u32,
    classes: usize,
) -> Result<Vec<PointLabel>, LabelError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let malformed = |why| LabelError::Malformed {
            path: path.to_path_buf(),
            line,
            text: raw.to_string(),
            why,
        };
        let parts: Vec<&str> = t.split_whitespace().collect();
        if parts.len() != 3 {
            return Err(malformed("expected three fields: x y class"));
        }
        let x: f32 = parts[0]
            .parse()
            .map_err(|_| malformed("x is not a number"))?;
        let y: f32 = parts[1]
            .parse()
            .map_err(|_| malformed("y is not a number"))?;
        let class: u32 = parts[2]
            .parse()
            .map_err(|_| malformed("class is not a whole number"))?;
        if !x.is_finite() || !y.is_finite() {
            return Err(malformed("x and y must be finite"));
        }
        if x < 0.0 || y < 0.0 || x >= width as f32 || y >= height as f32 {
            return Err(LabelError::Outside {
                path: path.to_path_buf(),
                line,
                x,
                y,
                width,
                height,
            });
        }
        if class as usize >= classes {
            return Err(LabelError::UnknownClass {
                path: path.to_path_buf(),
                line,
                class,
                classes,
            });
        }
        out.push(PointLabel { x, y, class });
    }
    Ok(out)
}

impl Field {
    /// The field's labels for an image of `width` x `height` (none without a label file).
    pub fn points(
        &self,
        width: u32,
        height: u32,
        classes: usize,
    ) -> Result<Vec<PointLabel>, LabelError> {
        let Some(path) = &self.labels_file else {
            return Ok(vec![]);
        };
        let text = std::fs::read_to_string(path).map_err(|source| LabelError::Io {
            path: path.clone(),
            source,
        })?;
        parse_points(&text, path, width, height, classes)
    }
}

/// Opens an image as RGB, its format told by its content (data sets hold PNGs named `.jpg`),
/// naming the file when it cannot be decoded.
pub fn open_image(path: &Path) -> Result<image::RgbImage, LabelError> {
    let err = |why: String| LabelError::Image {
        path: path.to_path_buf(),
        why,
    };
    image::ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?
        .decode()
        .map(|i| i.to_rgb8())
        .map_err(|e| err(e.to_string()))
}

/// Which side of the split a field falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

/// The split of a field by its name alone (so it never depends on which other fields are
/// present): a stable hash of the name, 70% train, 10% val, 20% test.
pub fn split_of(name: &str) -> Split {
    match fold_of(name, 10) {
        0 | 1 => Split::Test,
        2 => Split::Val,
        _ => Split::Train,
    }
}

/// The fold (`0..folds`) of a field by a stable hash of its name (FNV-1a), for k-fold
/// cross-validation by field.
pub fn fold_of(name: &str, folds: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // The low bits of FNV mix poorly: fold the high half in.
    ((h ^ (h >> 32)) % folds.max(1) as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<PointLabel>, LabelError> {
        parse_points(text, Path::new("labels/7.txt"), 640, 480, 13)
    }

    #[test]
    fn reads_point_labels() {
        let p = parse("594 95 0\n\n# comment\n601 151 12\n").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[1],
            PointLabel {
                x: 601.0,
                y: 151.0,
                class: 12
            }
        );
    }

    #[test]
    fn refuses_a_malformed_line_with_file_and_line() {
        let e = parse("1 2 0\n3 4\n").unwrap_err().to_string();
        assert!(e.starts_with("labels/7.txt:2: malformed"), "{e}");
        let e = parse("1 two 0\n").unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("y is not a number"), "{e}");
        let e = parse("1 2 -1\n").unwrap_err().to_string();
        assert!(e.contains("class is not a whole number"), "{e}");
    }

    #[test]
    fn refuses_a_label_outside_its_image() {
        let e = parse("1 2 0\n640 10 0\n").unwrap_err().to_string();
        assert!(
            e.starts_with("labels/7.txt:2: label at (640, 10) lies outside its 640x480 image"),
            "{e}"
        );
    }

    #[test]
    fn refuses_an_unknown_class() {
        let e = parse("1 2 13\n").unwrap_err().to_string();
        assert!(
            e.starts_with("labels/7.txt:1: unknown class id 13 (the data set has 13 classes"),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_label_file_without_its_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::fs::create_dir_all(dir.path().join("labels")).unwrap();
        std::fs::write(dir.path().join("images/1.jpg"), b"").unwrap();
        std::fs::write(dir.path().join("labels/1.txt"), b"1 1 0\n").unwrap();
        assert_eq!(point_fields(dir.path()).unwrap().len(), 1);
        std::fs::write(dir.path().join("labels/2.txt"), b"1 1 0\n").unwrap();
        let e = point_fields(dir.path()).unwrap_err().to_string();
        assert!(e.contains("labels/2.txt: label file has no image"), "{e}");
        let e = point_fields(&dir.path().join("nothing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no images/ folder"), "{e}");
    }

    #[test]
    fn splits_by_name_alone() {
        let names: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let test = names.iter().filter(|n| split_of(n) == Split::Test).count();
        assert!((150..250).contains(&test), "{test} test fields of 1000");
        assert_eq!(split_of("17"), split_of("17"));
        let folds: Vec<usize> = (0..5)
            .map(|k| names.iter().filter(|n| fold_of(n, 5) == k).count())
            .collect();
        assert!(folds.iter().all(|&n| (150..250).contains(&n)), "{folds:?}");
    }
}
