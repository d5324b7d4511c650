//! Importing labelled data into training crops: every field of a labelled data set
//! ([`super::labelled`]) goes through the edge's own cell finder, each detection is cut as the
//! device cuts it, and it takes the class of the one label it holds (a point on its pixels, or
//! a box whose centre is on them and that overlaps it). What is not imported is counted by
//! reason: labels the finder missed, labels on objects it leaves out (cells cut by the frame,
//! debris), labels sharing one detection (merged cells), boxes that disagree with their
//! detection, classes a mapping drops; and detections holding no label. Fields are split by
//! name alone (train/val/test or k folds), so no field is on both sides.
//!
//! Output: `OUT/{split}/{class}/{field}_{n}.png` (the trainer's `{source}/{class}/image`
//! layout: with k folds, leave-one-source-out is k-fold cross-validation by field),
//! `OUT/crops.csv` (one row per crop), `OUT/classes.txt` (the classes in the data set's order,
//! which the trainer keeps) and `OUT/summary.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::RgbImage;
use reddino_models::preprocess::{CropPolicy, OwnerMap};
use serde::Serialize;

use super::labelled::{self, ClassMap, LabelError, LabelledField, Mark, Split};
use super::quality::Fields;
use super::FinderArgs;
use crate::cells::{self, CellFinderConfig};
use crate::error::{Error, Result as EdgeResult};

/// `reddino-edge import`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ImportArgs {
    /// Point labels: DIR/images, DIR/labels/*.txt (`x y class` per line, Chula RBC-12).
    #[arg(long)]
    pub points: Option<PathBuf>,
    /// Pascal VOC boxes: DIR/Annotations/*.xml, DIR/JPEGImages.
    #[arg(long)]
    pub voc: Option<PathBuf>,
    /// COCO boxes: a JSON file; images in --images (default: the file's folder).
    #[arg(long)]
    pub coco: Option<PathBuf>,
    /// Folder of a COCO file's images.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Crops already cut, in class folders: DIR/{class}/*.png.
    #[arg(long)]
    pub crops: Option<PathBuf>,
    /// With --crops: a crop's field is its file name up to the last SEP (crops of one
    /// field then stay on one side of the split); default: each crop its own field.
    #[arg(long)]
    pub field_sep: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
    /// Class names of point labels, one per line (line i names id i); default:
    /// DIR/classes.txt, else the Chula RBC-12 names for 13 ids.
    #[arg(long)]
    pub class_names: Option<PathBuf>,
    /// Class mapping, `from = to` per line (`to` = `-` drops the class); a class it does
    /// not name is refused.
    #[arg(long)]
    pub class_map: Option<PathBuf>,
    /// Which fields: the development fields, the held-out ones (split by name), or all.
    #[arg(long, value_enum, default_value = "all")]
    pub fields: Fields,
    /// K folds by field (fold0..) instead of train/val/test.
    #[arg(long)]
    pub folds: Option<u32>,
    #[command(flatten)]
    pub finder: FinderArgs,
    #[command(flatten)]
    pub crop: reddino_models::cli::CropArgs,
    /// Also write the detections that hold no label here (for self-supervised pretraining).
    #[arg(long)]
    pub unlabelled: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `reddino-edge import`: reads the one data set given, imports it, prints the summary.
pub fn command(args: &ImportArgs) -> EdgeResult<()> {
    let given = [&args.points, &args.voc, &args.coco, &args.crops];
    if given.iter().filter(|g| g.is_some()).count() != 1 {
        return Err(Error::Usage(
            "give exactly one of --points, --voc, --coco or --crops".into(),
        ));
    }
    let mut cfg = ImportConfig::new(args.out.clone());
    cfg.finder = args.finder.config()?;
    cfg.crop = args.crop.policy();
    cfg.unlabelled = args.unlabelled.clone();
    cfg.scheme = match args.folds {
        Some(k) if k >= 2 => Scheme::Folds(k),
        Some(k) => return Err(Error::Usage(format!("--folds {k}: need 2 or more"))),
        None => Scheme::TrainValTest,
    };
    cfg.class_map = args.class_map.as_deref().map(ClassMap::read).transpose()?;
    let progress = |d: usize, n: usize| eprint!("\rimporting: {d}/{n}");
    let summary = if let Some(dir) = &args.crops {
        let all = labelled::read_crop_folders(dir, args.field_sep.as_deref())?;
        let all: Vec<_> = all
            .into_iter()
            .filter(|c| args.fields.holds(&c.1))
            .collect();
        import_crops(&all, &cfg, progress)?
    } else {
        let set = if let Some(dir) = &args.points {
            let names_file = args
                .class_names
                .clone()
                .or_else(|| Some(dir.join("classes.txt")).filter(|p| p.is_file()));
            let names = match names_file {
                Some(f) => labelled::read_class_names(&f)?,
                None => labelled::CHULA_CLASSES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            };
            cfg.class_order = names.clone();
            labelled::read_point_set(dir, &names)?
        } else if let Some(dir) = &args.voc {
            labelled::read_voc(dir)?
        } else if let Some(file) = &args.coco {
            let dir = args
                .images
                .clone()
                .unwrap_or_else(|| file.parent().map(|p| p.to_path_buf()).unwrap_or_default());
            labelled::read_coco(file, &dir)?
        } else {
            unreachable!("exactly one source is given")
        };
        let set: Vec<_> = set
            .into_iter()
            .filter(|f| args.fields.holds(&f.name))
            .collect();
        eprintln!("{} labelled fields checked", set.len());
        import_fields(&set, &cfg, progress)?
    };
    eprintln!();
    if args.json {
        println!("{}", serde_json::to_string(&summary).expect("serialisable"));
    } else {
        print!("{}", summary.report());
        println!("crops in {}", cfg.out.display());
    }
    Ok(())
}

/// How fields are split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    /// 70% train, 10% val, 20% test ([`labelled::split_of`]).
    TrainValTest,
    /// `fold0` .. `fold{k-1}` ([`labelled::fold_of`]).
    Folds(u32),
}

impl Scheme {
    /// The folder of field `name`.
    pub fn part(&self, name: &str) -> String {
        match self {
            Scheme::TrainValTest => match labelled::split_of(name) {
                Split::Train => "train".into(),
                Split::Val => "val".into(),
                Split::Test => "test".into(),
            },
            Scheme::Folds(k) => format!("fold{}", labelled::fold_of(name, *k)),
        }
    }
}

/// Settings of an import.
#[derive(Debug, Clone)]
pub struct ImportConfig {
    pub out: PathBuf,
    pub finder: CellFinderConfig,
    /// How the crops are cut (as the device cuts them for a model with this policy).
    pub crop: CropPolicy,
    pub scheme: Scheme,
    pub class_map: Option<ClassMap>,
    /// Also write the detections holding no label to this folder (e.g. for self-supervised
    /// pretraining).
    pub unlabelled: Option<PathBuf>,
    /// A box label and its detection must overlap by at least this IoU.
    pub min_iou: f32,
    /// The data set's class names in its own order (before `class_map`): `classes.txt` lists
    /// the imported classes in this order, any others after them by name.
    pub class_order: Vec<String>,
}

impl ImportConfig {
    pub fn new(out: PathBuf) -> Self {
        ImportConfig {
            out,
            finder: CellFinderConfig::real_smear(),
            crop: CropPolicy::default(),
            scheme: Scheme::TrainValTest,
            class_map: None,
            unlabelled: None,
            min_iou: 0.3,
            class_order: Vec::new(),
        }
    }
}

/// Why a label was not imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dropped {
    /// No detection at the label: the finder missed the cell.
    Missed,
    /// On an object the finder leaves out: a cell cut by the frame's edge, debris.
    LeftOut,
    /// Its detection holds another label too (touching cells found as one).
    Merged,
    /// A box whose detection overlaps it by less than the minimum IoU.
    BoxMismatch,
    /// The class mapping drops its class.
    ClassDropped,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::Missed,
        Dropped::LeftOut,
        Dropped::Merged,
        Dropped::BoxMismatch,
        Dropped::ClassDropped,
    ];
    pub fn describe(self) -> &'static str {
        match self {
            Dropped::Missed => "no detection at the label (missed by the finder)",
            Dropped::LeftOut => "on an object the finder leaves out (cut by the frame, debris)",
            Dropped::Merged => "its detection holds another label too (merged cells)",
            Dropped::BoxMismatch => "box and detection overlap too little",
            Dropped::ClassDropped => "class dropped by the mapping file",
        }
    }
}

/// What one field gave.
#[derive(Debug, Clone, Serialize)]
pub struct FieldImport {
    pub name: String,
    pub part: String,
    pub labels: usize,
    pub detections: usize,
    pub crops: usize,
    pub unlabelled_detections: usize,
    pub dropped: BTreeMap<Dropped, usize>,
}

/// What an import wrote and left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    pub fields: usize,
    pub labels: usize,
    pub crops: usize,
    /// Crops per part (split or fold), then per class.
    pub per_part: BTreeMap<String, BTreeMap<String, usize>>,
    /// Labels not imported, per reason.
    pub dropped: BTreeMap<Dropped, usize>,
    /// Detections holding no label (cells the data set leaves unlabelled, white cells,
    /// debris, fragments).
    pub unlabelled_detections: usize,
    pub per_field: Vec<FieldImport>,
}

impl ImportSummary {
    fn add(&mut self, f: FieldImport) {
        self.fields += 1;
        self.labels += f.labels;
        self.crops += f.crops;
        self.unlabelled_detections += f.unlabelled_detections;
        for (r, n) in &f.dropped {
            *self.dropped.entry(*r).or_default() += n;
        }
        self.per_field.push(f);
    }

    /// A few lines for people: crops per class and part, and what was left out and why.
    pub fn report(&self) -> String {
        let mut s = format!(
            "{} fields, {} labels: {} crops imported ({:.1}%)\n",
            self.fields,
            self.labels,
            self.crops,
            100.0 * self.crops as f64 / self.labels.max(1) as f64
        );
        let classes: std::collections::BTreeSet<&String> =
            self.per_part.values().flat_map(|m| m.keys()).collect();
        let parts: Vec<&String> = self.per_part.keys().collect();
        s += &format!(
            "{:<16}{}\n",
            "class",
            parts.iter().map(|p| format!("{p:>8}")).collect::<String>()
        );
        for c in classes {
            s += &format!(
                "{c:<16}{}\n",
                parts
                    .iter()
                    .map(|p| format!("{:>8}", self.per_part[*p].get(c).unwrap_or(&0)))
                    .collect::<String>()
            );
        }
        for r in Dropped::ALL {
            if let Some(n) = self.dropped.get(&r) {
                s += &format!("dropped {n} labels: {}\n", r.describe());
            }
        }
        s += &format!(
            "{} detections hold no label (unlabelled cells, white cells, debris)\n",
            self.unlabelled_detections
        );
        s
    }
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("{}: {why}", path.display())]
    Output { path: PathBuf, why: String },
}

fn out_err(path: &Path) -> impl Fn(std::io::Error) -> ImportError + '_ {
    move |e| ImportError::Output {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// The output folder, created; refused when it already holds files (crops of an earlier
/// import would mix into the new split).
fn prepare_out(dir: &Path) -> Result<(), ImportError> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(out_err(dir))?;
        if entries.next().is_some() {
            return Err(ImportError::Output {
                path: dir.to_path_buf(),
                why: "not empty: give a new or empty folder (crops of an earlier import would mix into this split)".into(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(out_err(dir))
}

/// The label each detection holds, or why each label was dropped: the labels' classes after
/// the mapping (`None`: dropped by it).
pub fn match_labels(
    found: &[cells::Cell],
    owners: &OwnerMap,
    field: &LabelledField,
    classes: &[Option<String>],
    min_iou: f32,
) -> (Vec<Option<usize>>, Vec<Option<Dropped>>) {
    let mut holders: Vec<Vec<usize>> = vec![Vec::new(); found.len()];
    let mut why: Vec<Option<Dropped>> = vec![None; field.labels.len()];
    for (j, l) in field.labels.iter().enumerate() {
        let (x, y) = l.mark.centre();
        match super::quality::owner_near(owners, x, y) {
            Some(i) => holders[i].push(j),
            None => {
                let (px, py) = (
                    (x as u32).min(owners.width - 1),
                    (y as u32).min(owners.height - 1),
                );
                let id = owners.ids[(py * owners.width + px) as usize];
                why[j] = Some(if id == OwnerMap::OTHER {
                    Dropped::LeftOut
                } else {
                    Dropped::Missed
                });
            }
        }
    }
    let mut label = vec![None; found.len()];
    for (i, h) in holders.iter().enumerate() {
        match h.as_slice() {
            [] => {}
            [j] => {
                let l = &field.labels[*j];
                if let Mark::Box(b) = l.mark {
                    if iou(b, found[i].bbox) < min_iou {
                        why[*j] = Some(Dropped::BoxMismatch);
                        continue;
                    }
                }
                if classes[*j].is_none() {
                    why[*j] = Some(Dropped::ClassDropped);
                    continue;
                }
                label[i] = Some(*j);
            }
            many => {
                for &j in many {
                    why[j] = Some(Dropped::Merged);
                }
            }
        }
    }
    (label, why)
}

fn iou(a: [f32; 4], b: [u32; 4]) -> f32 {
    let b = b.map(|v| v as f32);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter).max(1e-6)
}

/// Imports labelled fields into crops under `cfg.out`. Every label's class is checked against
/// the mapping before anything is written. `progress(done, total)` after each field.
pub fn import_fields(
    fields: &[LabelledField],
    cfg: &ImportConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<ImportSummary, ImportError> {
    // Classes first: an unmapped class is refused before any crop is written.
    let mut classes: Vec<Vec<Option<String>>> = Vec::with_capacity(fields.len());
    for f in fields {
        classes.push(
            f.labels
                .iter()
                .map(|l| match &cfg.class_map {
                    Some(m) => m.apply(l),
                    None => Ok(Some(l.class.clone())),
                })
                .collect::<Result<_, _>>()?,
        );
    }
    prepare_out(&cfg.out)?;
    if let Some(u) = &cfg.unlabelled {
        prepare_out(u)?;
    }
    let csv_path = cfg.out.join("crops.csv");
    let mut csv =
        std::io::BufWriter::new(std::fs::File::create(&csv_path).map_err(out_err(&csv_path))?);
    writeln!(
        csv,
        "file,field,part,class,x0,y0,x1,y1,label_file,label_line"
    )
    .map_err(out_err(&csv_path))?;
    let mut summary = ImportSummary::default();
    let mut made = std::collections::HashSet::new();
    for (k, (field, classes)) in fields.iter().zip(&classes).enumerate() {
        let img = labelled::open_image(&field.image)?;
        let part = cfg.scheme.part(&field.name);
        let (found, owners) = cells::find_with_owners(&img, &cfg.finder);
        let (label, why) = match_labels(&found, &owners, field, classes, cfg.min_iou);
        let crops = crate::crop::cut(&img, &found, Some(&owners), &cfg.crop);
        let mut fi = FieldImport {
            name: field.name.clone(),
            part: part.clone(),
            labels: field.labels.len(),
            detections: found.len(),
            crops: 0,
            unlabelled_detections: 0,
            dropped: BTreeMap::new(),
        };
        for r in why.iter().flatten() {
            *fi.dropped.entry(*r).or_default() += 1;
        }
        for (i, (crop, l)) in crops.iter().zip(&label).enumerate() {
            let file = format!("{}_{i:03}.png", field.name);
            let Some(j) = l else {
                fi.unlabelled_detections += 1;
                if let Some(u) = &cfg.unlabelled {
                    save(crop, &u.join(&file))?;
                }
                continue;
            };
            let class = classes[*j].as_deref().expect("mapped");
            ensure_dir(&mut made, &cfg.out.join(&part).join(class))?;
            let rel = format!("{part}/{class}/{file}");
            save(crop, &cfg.out.join(&rel))?;
            let b = found[i].bbox;
            let lab = &field.labels[*j];
            writeln!(
                csv,
                "{rel},{},{part},{class},{},{},{},{},{},{}",
                csv_field(&field.name),
                b[0],
                b[1],
                b[2],
                b[3],
                csv_field(&lab.path.display().to_string()),
                lab.line
            )
            .map_err(out_err(&csv_path))?;
            *summary
                .per_part
                .entry(part.clone())
                .or_default()
                .entry(class.to_string())
                .or_default() += 1;
            fi.crops += 1;
        }
        summary.add(fi);
        progress(k + 1, fields.len());
    }
    csv.flush().map_err(out_err(&csv_path))?;
    write_summary(&cfg.out, &summary)?;
    write_classes(cfg, &summary)?;
    Ok(summary)
}

/// The imported classes in the data set's order (`cfg.class_order` through the class map,
/// then the classes it lacks by name): the class order of a model trained on the crops.
pub fn class_order(cfg: &ImportConfig, summary: &ImportSummary) -> Vec<String> {
    let imported: std::collections::BTreeSet<&String> =
        summary.per_part.values().flat_map(|c| c.keys()).collect();
    let mut order: Vec<String> = Vec::new();
    for name in &cfg.class_order {
        let mapped = match &cfg.class_map {
            Some(m) => m.get(name).cloned().flatten(),
            None => Some(name.clone()),
        };
        if let Some(c) = mapped {
            if imported.contains(&c) && !order.contains(&c) {
                order.push(c);
            }
        }
    }
    for c in imported {
        if !order.contains(c) {
            order.push(c.clone());
        }
    }
    order
}

/// `OUT/classes.txt`: [`class_order`], one name per line (the trainer reads it).
fn write_classes(cfg: &ImportConfig, summary: &ImportSummary) -> Result<(), ImportError> {
    let path = cfg.out.join("classes.txt");
    let mut text = class_order(cfg, summary).join("\n");
    text.push('\n');
    std::fs::write(&path, text).map_err(out_err(&path))
}

/// Imports crops already cut (`(class, field, file)` from [`labelled::read_crop_folders`]):
/// each is copied as PNG into its field's part, its class mapped.
pub fn import_crops(
    crops: &[(String, String, PathBuf)],
    cfg: &ImportConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<ImportSummary, ImportError> {
    let classes: Vec<Option<String>> = crops
        .iter()
        .map(|(class, _, file)| match &cfg.class_map {
            Some(m) => m.apply(&labelled::CellLabel {
                mark: Mark::Point { x: 0.0, y: 0.0 },
                class: class.clone(),
                path: file.clone(),
                line: 1,
            }),
            None => Ok(Some(class.clone())),
        })
        .collect::<Result<_, _>>()?;
    prepare_out(&cfg.out)?;
    let csv_path = cfg.out.join("crops.csv");
    let mut csv =
        std::io::BufWriter::new(std::fs::File::create(&csv_path).map_err(out_err(&csv_path))?);
    writeln!(csv, "file,field,part,class,source").map_err(out_err(&csv_path))?;
    let mut summary = ImportSummary::default();
    let mut per_field: BTreeMap<&str, FieldImport> = BTreeMap::new();
    let mut made = std::collections::HashSet::new();
    for (k, ((_, field, file), class)) in crops.iter().zip(&classes).enumerate() {
        progress(k + 1, crops.len());
        let part = cfg.scheme.part(field);
        let fi = per_field.entry(field).or_insert_with(|| FieldImport {
            name: field.clone(),
            part: part.clone(),
            labels: 0,
            detections: 0,
            crops: 0,
            unlabelled_detections: 0,
            dropped: BTreeMap::new(),
        });
        fi.labels += 1;
        let Some(class) = class else {
            *fi.dropped.entry(Dropped::ClassDropped).or_default() += 1;
            continue;
        };
        let img = labelled::open_image(file)?;
        let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("crop");
        ensure_dir(&mut made, &cfg.out.join(&part).join(class))?;
        let rel = format!("{part}/{class}/{stem}.png");
        let dest = cfg.out.join(&rel);
        if dest.exists() {
            return Err(ImportError::Output {
                path: file.clone(),
                why: format!("two crops would be written to {rel} (same file name in two class folders that map to one class)"),
            });
        }
        save(&img, &dest)?;
        writeln!(
            csv,
            "{rel},{},{part},{class},{}",
            csv_field(field),
            csv_field(&file.display().to_string())
        )
        .map_err(out_err(&csv_path))?;
        *summary
            .per_part
            .entry(part)
            .or_default()
            .entry(class.clone())
            .or_default() += 1;
        fi.crops += 1;
    }
    for (_, fi) in per_field {
        summary.add(fi);
    }
    csv.flush().map_err(out_err(&csv_path))?;
    write_summary(&cfg.out, &summary)?;
    write_classes(cfg, &summary)?;
    Ok(summary)
}

/// Creates `dir` once per import.
fn ensure_dir(
    made: &mut std::collections::HashSet<PathBuf>,
    dir: &Path,
) -> Result<(), ImportError> {
    if !made.contains(dir) {
        std::fs::create_dir_all(dir).map_err(out_err(dir))?;
        made.insert(dir.to_path_buf());
    }
    Ok(())
}

fn save(img: &RgbImage, path: &Path) -> Result<(), ImportError> {
    img.save(path).map_err(|e| ImportError::Output {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn write_summary(out: &Path, s: &ImportSummary) -> Result<(), ImportError> {
    let path = out.join("summary.json");
    let json = serde_json::to_string_pretty(s).expect("summary serialises");
    std::fs::write(&path, json).map_err(out_err(&path))
}

/// A CSV field, quoted when it needs to be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
