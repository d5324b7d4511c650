//! Labelled fields as users have them, read and checked, and split by field: point labels (an
//! `images/` folder and a `labels/` folder of `x y class` files, the layout of Chula RBC-12),
//! box labels from annotation tools (Pascal VOC XML, COCO JSON), and folders of crops named by
//! their class; class names from the data set, a names file or a mapping file. Every refusal
//! names the file and the line: a malformed line, a label outside its image, an unknown class,
//! a label without its image.

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
    #[error("{}:{line}: {why}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{}:{line}: image {} not found", path.display(), image.display())]
    NoImage {
        path: PathBuf,
        line: usize,
        image: PathBuf,
    },
    #[error("{}:{line}: class {class:?} is not in {} (it names: {known})", path.display(), table.display())]
    UnmappedClass {
        path: PathBuf,
        line: usize,
        class: String,
        table: PathBuf,
        known: String,
    },
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
    image_reader(path)?
        .decode()
        .map(|i| i.to_rgb8())
        .map_err(|e| image_error(path, e))
}

fn image_error(path: &Path, e: impl std::fmt::Display) -> LabelError {
    LabelError::Image {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// A reader of the image at `path`, its format told by its content.
fn image_reader(
    path: &Path,
) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>, LabelError> {
    image::ImageReader::open(path)
        .map_err(|e| image_error(path, e))?
        .with_guessed_format()
        .map_err(|e| image_error(path, e))
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

/// The class names of Chula RBC-12's ids 0-12, in order (the names a point-labelled set gets
/// when it brings none).
pub const CHULA_CLASSES: [&str; 13] = [
    "normal",
    "macrocyte",
    "microcyte",
    "spherocyte",
    "target_cell",
    "stomatocyte",
    "ovalocyte",
    "teardrop",
    "burr_cell",
    "schistocyte",
    "uncategorised",
    "hypochromia",
    "elliptocyte",
];

/// Where a cell is marked: its centre, or its box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mark {
    Point {
        x: f32,
        y: f32,
    },
    /// `[x0, y0, x1, y1]` in pixels, x1/y1 exclusive.
    Box([f32; 4]),
}

impl Mark {
    pub fn centre(&self) -> (f32, f32) {
        match *self {
            Mark::Point { x, y } => (x, y),
            Mark::Box([x0, y0, x1, y1]) => (0.5 * (x0 + x1), 0.5 * (y0 + y1)),
        }
    }
}

/// A labelled cell in any format: where it is, its class name, and the file and line of its
/// label (for reports).
#[derive(Debug, Clone, PartialEq)]
pub struct CellLabel {
    pub mark: Mark,
    pub class: String,
    pub path: PathBuf,
    pub line: usize,
}

/// A labelled field in any format, its labels checked against its image's size.
#[derive(Debug, Clone)]
pub struct LabelledField {
    pub name: String,
    pub image: PathBuf,
    pub width: u32,
    pub height: u32,
    pub labels: Vec<CellLabel>,
}

/// The size of an image from its header, its format told by its content.
pub fn image_size(path: &Path) -> Result<(u32, u32), LabelError> {
    image_reader(path)?
        .into_dimensions()
        .map_err(|e| image_error(path, e))
}

fn read_text(path: &Path) -> Result<String, LabelError> {
    std::fs::read_to_string(path).map_err(|source| LabelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Class names, one per line (line `i` names class id `i`; blank lines and `#` comments are
/// not allowed to shift the ids, so they are refused).
pub fn read_class_names(path: &Path) -> Result<Vec<String>, LabelError> {
    let text = read_text(path)?;
    let mut names: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let name = raw.trim();
        let bad = |why: &str| LabelError::Invalid {
            path: path.to_path_buf(),
            line: i + 1,
            why: why.to_string(),
        };
        if name.is_empty() || name.contains(char::is_whitespace) || name.contains('/') {
            return Err(bad(
                "expected one class name per line (no blanks, spaces or slashes)",
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(bad(&format!("class name {name:?} given twice")));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(LabelError::Invalid {
            path: path.to_path_buf(),
            line: 1,
            why: "no class names".into(),
        });
    }
    Ok(names)
}

/// A class mapping file: `from = to` per line (`#` comments), `to` a class name or `-` to drop
/// the class. A class the file does not name is refused where its label is.
#[derive(Debug, Clone)]
pub struct ClassMap {
    pub path: PathBuf,
    /// `from` -> `Some(to)`, or `None` to drop.
    pub map: std::collections::BTreeMap<String, Option<String>>,
}

impl ClassMap {
    pub fn read(path: &Path) -> Result<ClassMap, LabelError> {
        let text = read_text(path)?;
        let mut map = std::collections::BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let t = raw.split('#').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            let bad = |why: String| LabelError::Invalid {
                path: path.to_path_buf(),
                line: i + 1,
                why,
            };
            let Some((from, to)) = t.split_once('=') else {
                return Err(bad(format!("expected `from = to`, got {t:?}")));
            };
            let (from, to) = (from.trim(), to.trim());
            if from.is_empty()
                || to.is_empty()
                || to.contains(char::is_whitespace)
                || to.contains('/')
            {
                return Err(bad(format!(
                    "expected `from = to` with a class name (no spaces or slashes) or `-`, got {t:?}"
                )));
            }
            if map
                .insert(from.to_string(), (to != "-").then(|| to.to_string()))
                .is_some()
            {
                return Err(bad(format!("class {from:?} mapped twice")));
            }
        }
        Ok(ClassMap {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The class `label` is imported as (`None`: dropped by the map).
    /// What `class` maps to (`Some(None)`: dropped), if the table names it.
    pub fn get(&self, class: &str) -> Option<&Option<String>> {
        self.map.get(class)
    }

    pub fn apply(&self, label: &CellLabel) -> Result<Option<String>, LabelError> {
        match self.map.get(&label.class) {
            Some(to) => Ok(to.clone()),
            None => Err(LabelError::UnmappedClass {
                path: label.path.clone(),
                line: label.line,
                class: label.class.clone(),
                table: self.path.clone(),
                known: self.map.keys().cloned().collect::<Vec<_>>().join(", "),
            }),
        }
    }
}

/// A point-labelled data set (`dir/images`, `dir/labels`), each class id named by `names`
/// (ids outside it are refused). Fields without labels are left out.
pub fn read_point_set(dir: &Path, names: &[String]) -> Result<Vec<LabelledField>, LabelError> {
    let mut out = Vec::new();
    for f in point_fields(dir)? {
        if f.labels_file.is_none() {
            continue;
        }
        let (width, height) = image_size(&f.image)?;
        let path = f.labels_file.clone().expect("has labels");
        let text = read_text(&path)?;
        // Line numbers of the labels: parse_points skips blank lines and comments.
        let lines: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim().starts_with('#'))
            .map(|(i, _)| i + 1)
            .collect();
        let points = parse_points(&text, &path, width, height, names.len())?;
        let labels = points
            .iter()
            .zip(lines)
            .map(|(p, line)| CellLabel {
                mark: Mark::Point { x: p.x, y: p.y },
                class: names[p.class as usize].clone(),
                path: path.clone(),
                line,
            })
            .collect();
        out.push(LabelledField {
            name: f.name,
            image: f.image,
            width,
            height,
            labels,
        });
    }
    Ok(out)
}

/// Checks a box `[x0, y0, x1, y1]` against its image.
fn check_box(
    b: [f32; 4],
    path: &Path,
    line: usize,
    width: u32,
    height: u32,
) -> Result<Mark, LabelError> {
    let [x0, y0, x1, y1] = b;
    if b.iter().any(|v| !v.is_finite()) || x1 <= x0 || y1 <= y0 {
        return Err(LabelError::Invalid {
            path: path.to_path_buf(),
            line,
            why: format!("box ({x0}, {y0})-({x1}, {y1}) has no area"),
        });
    }
    // Annotation tools round boxes out by a pixel; more than that is outside.
    for (x, y) in [(x0, y0), (x1, y1)] {
        if x < -1.0 || y < -1.0 || x > width as f32 + 1.0 || y > height as f32 + 1.0 {
            return Err(LabelError::Outside {
                path: path.to_path_buf(),
                line,
                x,
                y,
                width,
                height,
            });
        }
    }
    Ok(Mark::Box([
        x0.max(0.0),
        y0.max(0.0),
        x1.min(width as f32),
        y1.min(height as f32),
    ]))
}

/// The image named by a label file: `name` in each of `dirs`, else the file's stem with an
/// image extension.
fn find_image(dirs: &[PathBuf], name: Option<&str>, stem: &str) -> Option<PathBuf> {
    for d in dirs {
        if let Some(n) = name {
            let p = d.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
        for ext in IMAGE_EXTENSIONS {
            let p = d.join(format!("{stem}.{ext}"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A Pascal VOC data set: `dir/Annotations/*.xml` (or `*.xml` in `dir`), images in
/// `dir/JPEGImages`, `dir/images` or beside the XML, one `<object>` per cell with its `<name>`
/// and `<bndbox>` (VOC's 1-based pixel corners).
pub fn read_voc(dir: &Path) -> Result<Vec<LabelledField>, LabelError> {
    let ann = if dir.join("Annotations").is_dir() {
        dir.join("Annotations")
    } else {
        dir.to_path_buf()
    };
    let mut xmls: Vec<PathBuf> = std::fs::read_dir(&ann)
        .map_err(|source| LabelError::Io {
            path: ann.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("xml"))
        .collect();
    if xmls.is_empty() {
        return Err(LabelError::Layout {
            path: dir.to_path_buf(),
            why: "no Pascal VOC .xml files (looked in Annotations/ and the folder itself)".into(),
        });
    }
    xmls.sort();
    let dirs = [
        dir.join("JPEGImages"),
        dir.join("images"),
        ann.clone(),
        dir.to_path_buf(),
    ];
    let mut out = Vec::new();
    for xml in xmls {
        let text = read_text(&xml)?;
        let doc = roxmltree::Document::parse(&text).map_err(|e| LabelError::Invalid {
            path: xml.clone(),
            line: e.pos().row as usize,
            why: format!("not valid XML: {e}"),
        })?;
        let line_of = |n: roxmltree::Node| doc.text_pos_at(n.range().start).row as usize;
        let bad = |n: roxmltree::Node, why: String| LabelError::Invalid {
            path: xml.clone(),
            line: line_of(n),
            why,
        };
        let root = doc.root_element();
        fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
            n.children().find(|c| c.has_tag_name(tag))
        }
        let text_of = |n: roxmltree::Node, tag: &str| -> Result<String, LabelError> {
            child(n, tag)
                .and_then(|c| c.text())
                .map(|t| t.trim().to_string())
                .ok_or_else(|| bad(n, format!("<{}> has no <{tag}>", n.tag_name().name())))
        };
        let stem = xml.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let filename = child(root, "filename")
            .and_then(|c| c.text())
            .map(str::trim);
        let Some(image) = find_image(&dirs, filename, stem) else {
            return Err(LabelError::NoImage {
                line: child(root, "filename").map(line_of).unwrap_or(1),
                path: xml.clone(),
                image: dirs[0].join(filename.unwrap_or(stem)),
            });
        };
        let (width, height) = image_size(&image)?;
        let mut labels = Vec::new();
        for obj in root.children().filter(|c| c.has_tag_name("object")) {
            let class = text_of(obj, "name")?;
            let bb =
                child(obj, "bndbox").ok_or_else(|| bad(obj, "<object> has no <bndbox>".into()))?;
            let mut v = [0f32; 4];
            for (k, tag) in ["xmin", "ymin", "xmax", "ymax"].iter().enumerate() {
                let t = text_of(bb, tag)?;
                v[k] = t
                    .parse()
                    .map_err(|_| bad(bb, format!("<{tag}> is not a number: {t:?}")))?;
            }
            // VOC corners are 1-based and inclusive.
            let b = [v[0] - 1.0, v[1] - 1.0, v[2], v[3]];
            let line = line_of(obj);
            labels.push(CellLabel {
                mark: check_box(b, &xml, line, width, height)?,
                class,
                path: xml.clone(),
                line,
            });
        }
        out.push(LabelledField {
            name: stem.to_string(),
            image,
            width,
            height,
            labels,
        });
    }
    out.sort_by_key(|f| natural_key(&f.name));
    Ok(out)
}

/// A COCO detection file: its `images` (found in `images_dir`), `categories` (class names) and
/// `annotations` (`bbox` = `[x, y, width, height]`). Errors name the line of the entry.
pub fn read_coco(file: &Path, images_dir: &Path) -> Result<Vec<LabelledField>, LabelError> {
    use serde::Deserialize;
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow)]
        images: Vec<&'a RawValue>,
        #[serde(borrow, default)]
        annotations: Vec<&'a RawValue>,
        #[serde(borrow)]
        categories: Vec<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Image {
        id: u64,
        file_name: String,
    }
    #[derive(Deserialize)]
    struct Category {
        id: u64,
        name: String,
    }
    #[derive(Deserialize)]
    struct Annotation {
        image_id: u64,
        category_id: u64,
        bbox: [f32; 4],
    }
    let text = read_text(file)?;
    let top: Top = serde_json::from_str(&text).map_err(|e| LabelError::Invalid {
        path: file.to_path_buf(),
        line: e.line(),
        why: format!("not a COCO file: {e}"),
    })?;
    let line_of = |r: &RawValue| {
        let off = r.get().as_ptr() as usize - text.as_ptr() as usize;
        text[..off].bytes().filter(|&b| b == b'\n').count() + 1
    };
    fn entry<'a, T: Deserialize<'a>>(
        r: &'a RawValue,
        file: &Path,
        line: usize,
        what: &str,
    ) -> Result<T, LabelError> {
        serde_json::from_str(r.get()).map_err(|e| LabelError::Invalid {
            path: file.to_path_buf(),
            line: line + e.line() - 1,
            why: format!("not a COCO {what}: {e}"),
        })
    }
    let mut cats = std::collections::BTreeMap::new();
    for r in &top.categories {
        let c: Category = entry(r, file, line_of(r), "category")?;
        cats.insert(c.id, c.name);
    }
    let mut fields: Vec<LabelledField> = Vec::new();
    let mut by_id = std::collections::BTreeMap::new();
    for r in &top.images {
        let line = line_of(r);
        let im: Image = entry(r, file, line, "image")?;
        let path = images_dir.join(&im.file_name);
        if !path.is_file() {
            return Err(LabelError::NoImage {
                path: file.to_path_buf(),
                line,
                image: path,
            });
        }
        let (width, height) = image_size(&path)?;
        by_id.insert(im.id, fields.len());
        fields.push(LabelledField {
            name: Path::new(&im.file_name)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(&im.file_name)
                .to_string(),
            image: path,
            width,
            height,
            labels: vec![],
        });
    }
    for r in &top.annotations {
        let line = line_of(r);
        let a: Annotation = entry(r, file, line, "annotation")?;
        let bad = |why: String| LabelError::Invalid {
            path: file.to_path_buf(),
            line,
            why,
        };
        let &i = by_id
            .get(&a.image_id)
            .ok_or_else(|| bad(format!("annotation of unknown image id {}", a.image_id)))?;
        let class = cats.get(&a.category_id).cloned().ok_or_else(|| {
            bad(format!(
                "unknown category id {} (the file has {})",
                a.category_id,
                cats.keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let [x, y, w, h] = a.bbox;
        let f = &mut fields[i];
        let mark = check_box([x, y, x + w, y + h], file, line, f.width, f.height)?;
        f.labels.push(CellLabel {
            mark,
            class,
            path: file.to_path_buf(),
            line,
        });
    }
    Ok(fields)
}

/// A folder of crops named by their class: `dir/{class}/*.png` (any image extension). Each
/// crop's field is its file stem up to the last `field_sep` (the whole stem without one), so
/// the crops of one field stay on one side of a split.
pub fn read_crop_folders(
    dir: &Path,
    field_sep: Option<&str>,
) -> Result<Vec<(String, String, PathBuf)>, LabelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LabelError::Io { path, source }
    };
    let mut out = Vec::new();
    for class in std::fs::read_dir(dir).map_err(io(dir))? {
        let class = class.map_err(io(dir))?.path();
        if !class.is_dir() {
            continue;
        }
        let name = class
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        for f in std::fs::read_dir(&class).map_err(io(&class))? {
            let f = f.map_err(io(&class))?.path();
            let ext = f
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if !ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                continue;
            }
            let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let field = match field_sep.and_then(|s| stem.rsplit_once(s)) {
                Some((field, _)) => field.to_string(),
                None => stem.to_string(),
            };
            out.push((name.clone(), field, f));
        }
    }
    if out.is_empty() {
        return Err(LabelError::Layout {
            path: dir.to_path_buf(),
            why: "no crops in {class}/ folders".into(),
        });
    }
    out.sort();
    Ok(out)
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
