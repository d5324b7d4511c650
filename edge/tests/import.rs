//! Importing labelled data sets into training crops, on the real sample fields in the tree
//! (Chula RBC-12, MIT licence): point labels, the same cells as Pascal VOC and COCO boxes,
//! class folders, class mappings, the split by field, and every refusal with its file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use reddino_edge::offline::import::{import_crops, import_fields, Dropped, ImportConfig, Scheme};
use reddino_edge::offline::labelled::{
    self, read_coco, read_crop_folders, read_point_set, read_voc, ClassMap, CHULA_CLASSES,
};

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/chula-rbc-12")
}

fn names() -> Vec<String> {
    CHULA_CLASSES.iter().map(|s| s.to_string()).collect()
}

/// Rows of crops.csv: (file, field, part, class).
fn csv_rows(out: &Path) -> Vec<(String, String, String, String)> {
    let text = std::fs::read_to_string(out.join("crops.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].into(), c[1].into(), c[2].into(), c[3].into())
        })
        .collect()
}

#[test]
fn point_labels_become_crops_split_by_field() {
    let fields = read_point_set(&samples(), &names()).unwrap();
    assert_eq!(fields.len(), 4);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ImportConfig::new(tmp.path().join("out"));
    cfg.scheme = Scheme::Folds(2);
    cfg.class_order = names();
    let mut calls = 0;
    let s = import_fields(&fields, &cfg, |_, n| {
        calls += 1;
        assert_eq!(n, 4)
    })
    .unwrap();
    assert_eq!(calls, 4, "progress after each field");
    let labels: usize = fields.iter().map(|f| f.labels.len()).sum();
    assert_eq!(s.labels, labels);
    // Every label is either imported or dropped for a reason.
    assert_eq!(s.crops + s.dropped.values().sum::<usize>(), labels, "{s:?}");
    // Most labelled cells away from the border become crops (the finder's recall on these
    // fields is >= 0.97; cells cut by the frame are left out as on the device).
    assert!(
        s.crops as f64 >= 0.8 * labels as f64,
        "{} crops of {labels} labels",
        s.crops
    );
    assert!(s.dropped.get(&Dropped::LeftOut).copied().unwrap_or(0) > 0);
    let rows = csv_rows(&cfg.out);
    assert_eq!(rows.len(), s.crops);
    // classes.txt: the imported classes in the data set's order (Chula's ids), none twice.
    let listed: Vec<String> = std::fs::read_to_string(cfg.out.join("classes.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let imported: BTreeSet<&String> = rows.iter().map(|r| &r.3).collect();
    assert_eq!(listed.len(), imported.len(), "{listed:?}");
    let ids: Vec<usize> = listed
        .iter()
        .map(|c| {
            CHULA_CLASSES
                .iter()
                .position(|k| k == c)
                .expect("a Chula class")
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{listed:?}");
    assert!(listed[0] == "normal" && listed.len() > 3, "{listed:?}");
    let mut part_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, field, part, class) in &rows {
        assert!(cfg.out.join(file).is_file(), "{file}");
        assert!(
            file.starts_with(&format!("{part}/{class}/{field}_")),
            "{file}"
        );
        assert!(CHULA_CLASSES.contains(&class.as_str()), "{class}");
        part_of
            .entry(field.clone())
            .or_default()
            .insert(part.clone());
    }
    // One field, one fold.
    for (field, parts) in &part_of {
        assert_eq!(parts.len(), 1, "field {field} in {parts:?}");
        assert_eq!(
            parts.iter().next().unwrap(),
            &format!("fold{}", labelled::fold_of(field, 2))
        );
    }
    // The summary on disk matches and the crops open at the size the finder cut them.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["crops"], s.crops);
    let img = image::open(cfg.out.join(&rows[0].0)).unwrap();
    assert!(img.width() >= 30 && img.width() == img.height());
    // Classes follow the labels: field 1 is normal cells, 34 target cells, 42 ovalocytes,
    // 222 spherocytes; no field gives a class more crops than it has labels of it.
    for (field, class) in [
        ("1", "normal"),
        ("34", "target_cell"),
        ("42", "ovalocyte"),
        ("222", "spherocyte"),
    ] {
        let f = fields.iter().find(|f| f.name == field).unwrap();
        let of = |c: &str| rows.iter().filter(|r| r.1 == field && r.3 == c).count();
        for c in CHULA_CLASSES {
            let labelled = f.labels.iter().filter(|l| l.class == c).count();
            assert!(of(c) <= labelled, "{field} {c}");
        }
        let main = f.labels.iter().filter(|l| l.class == class).count();
        assert!(
            of(class) as f64 >= 0.6 * main as f64,
            "{field}: {} of {main} {class}",
            of(class)
        );
    }
    let report = s.report();
    assert!(
        report.contains("merged") || report.contains("leaves out"),
        "{report}"
    );
    // A second import into the same folder is refused: crops would mix.
    let e = import_fields(&fields, &cfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
}

/// The sample fields' point labels written as boxes of a typical cell's size.
fn boxes_of(field: &labelled::LabelledField) -> Vec<(String, [f32; 4])> {
    field
        .labels
        .iter()
        .map(|l| {
            let (x, y) = l.mark.centre();
            let r = 21.0;
            (
                l.class.clone(),
                [
                    (x - r).max(0.0),
                    (y - r).max(0.0),
                    (x + r).min(field.width as f32 - 1.0),
                    (y + r).min(field.height as f32 - 1.0),
                ],
            )
        })
        .collect()
}

fn write_voc(dir: &Path, fields: &[labelled::LabelledField]) {
    std::fs::create_dir_all(dir.join("Annotations")).unwrap();
    std::fs::create_dir_all(dir.join("JPEGImages")).unwrap();
    for f in fields {
        let file = format!("{}.jpg", f.name);
        std::fs::copy(&f.image, dir.join("JPEGImages").join(&file)).unwrap();
        let mut xml = format!(
            "<annotation>\n  <filename>{file}</filename>\n  <size><width>{}</width><height>{}</height><depth>3</depth></size>\n",
            f.width, f.height
        );
        for (class, b) in boxes_of(f) {
            xml += &format!(
                "  <object>\n    <name>{class}</name>\n    <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>\n  </object>\n",
                b[0] + 1.0, b[1] + 1.0, b[2], b[3]
            );
        }
        xml += "</annotation>\n";
        std::fs::write(dir.join("Annotations").join(format!("{}.xml", f.name)), xml).unwrap();
    }
}

#[test]
fn voc_boxes_import_like_their_points() {
    let fields = read_point_set(&samples(), &names()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let voc = tmp.path().join("voc");
    write_voc(&voc, &fields);
    let boxes = read_voc(&voc).unwrap();
    assert_eq!(boxes.len(), 4);
    for (b, p) in boxes.iter().zip(&fields) {
        assert_eq!(
            (b.name.as_str(), b.labels.len()),
            (p.name.as_str(), p.labels.len())
        );
        assert_eq!(b.labels[0].class, p.labels[0].class);
        assert_eq!(b.labels[0].line, 4, "the first <object> is on line 4");
    }
    let mut cfg = ImportConfig::new(tmp.path().join("from_points"));
    let from_points = import_fields(&fields, &cfg, |_, _| {}).unwrap();
    cfg.out = tmp.path().join("from_boxes");
    let from_boxes = import_fields(&boxes, &cfg, |_, _| {}).unwrap();
    // The same cells: nearly the same crops (a few boxes overlap their cell too little).
    assert!(
        from_boxes.crops as f64 >= 0.9 * from_points.crops as f64,
        "{} from boxes, {} from points",
        from_boxes.crops,
        from_points.crops
    );
    // A demanding overlap drops boxes as mismatched, each counted.
    cfg.out = tmp.path().join("strict");
    cfg.min_iou = 0.95;
    let strict = import_fields(&boxes, &cfg, |_, _| {}).unwrap();
    assert!(strict.dropped[&Dropped::BoxMismatch] > 0);
    assert_eq!(
        strict.crops + strict.dropped.values().sum::<usize>(),
        strict.labels
    );
}

#[test]
fn voc_refusals_name_file_and_line() {
    let fields = read_point_set(&samples(), &names()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let voc = tmp.path().join("voc");
    write_voc(&voc, &fields[..1]);
    let xml = voc.join("Annotations/1.xml");
    let good = std::fs::read_to_string(&xml).unwrap();
    let err = |text: String| {
        std::fs::write(&xml, text).unwrap();
        read_voc(&voc).unwrap_err().to_string()
    };
    // A box outside its image: its <object>'s line.
    let e = err(good.replacen("<xmax>", "<xmax>9", 1));
    assert!(
        e.contains("1.xml:4: label at") && e.contains("outside its 640x480 image"),
        "{e}"
    );
    // A malformed number.
    let e = err(good.replacen("<ymin>", "<ymin>x", 1));
    assert!(
        e.contains("1.xml:") && e.contains("<ymin> is not a number"),
        "{e}"
    );
    // Not XML at all.
    let e = err(good.replacen("</annotation>", "", 1));
    assert!(e.contains("1.xml:") && e.contains("not valid XML"), "{e}");
    // A missing image: the line of <filename>.
    std::fs::remove_file(voc.join("JPEGImages/1.jpg")).unwrap();
    let e = err(good);
    assert!(
        e.contains("1.xml:2: image") && e.contains("not found"),
        "{e}"
    );
}

fn write_coco(path: &Path, fields: &[labelled::LabelledField], classes: &[String]) {
    let mut images = Vec::new();
    let mut anns = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        images.push(format!(
            "    {{\"id\": {i}, \"file_name\": \"{}\", \"width\": {}, \"height\": {}}}",
            f.image.file_name().unwrap().to_str().unwrap(),
            f.width,
            f.height
        ));
        for (class, b) in boxes_of(f) {
            let c = classes.iter().position(|n| *n == class).unwrap();
            anns.push(format!(
                "    {{\"id\": {}, \"image_id\": {i}, \"category_id\": {}, \"bbox\": [{}, {}, {}, {}]}}",
                anns.len(),
                c + 1,
                b[0],
                b[1],
                b[2] - b[0],
                b[3] - b[1]
            ));
        }
    }
    let cats: Vec<String> = classes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("    {{\"id\": {}, \"name\": \"{n}\"}}", i + 1))
        .collect();
    let json = format!(
        "{{\n  \"images\": [\n{}\n  ],\n  \"annotations\": [\n{}\n  ],\n  \"categories\": [\n{}\n  ]\n}}\n",
        images.join(",\n"),
        anns.join(",\n"),
        cats.join(",\n")
    );
    std::fs::write(path, json).unwrap();
}

#[test]
fn coco_boxes_import_and_refusals_name_the_line() {
    let fields = read_point_set(&samples(), &names()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cells.json");
    write_coco(&file, &fields, &names());
    let images = samples().join("images");
    let boxes = read_coco(&file, &images).unwrap();
    assert_eq!(boxes.len(), 4);
    for (b, p) in boxes.iter().zip(&fields) {
        assert_eq!(b.labels.len(), p.labels.len());
        assert_eq!(b.labels[3].class, p.labels[3].class);
    }
    // Images are lines 3-6 and annotations start on line 9.
    assert_eq!(boxes[0].labels[0].line, 9);
    let cfg = ImportConfig::new(tmp.path().join("out"));
    let s = import_fields(&boxes, &cfg, |_, _| {}).unwrap();
    assert!(s.crops as f64 >= 0.8 * s.labels as f64, "{s:?}");

    let good = std::fs::read_to_string(&file).unwrap();
    let err = |text: String| {
        std::fs::write(&file, text).unwrap();
        read_coco(&file, &images).unwrap_err().to_string()
    };
    let e = err(good.replacen("\"category_id\": 1,", "\"category_id\": 99,", 1));
    assert!(
        e.contains("cells.json:") && e.contains("unknown category id 99"),
        "{e}"
    );
    let line = good
        .lines()
        .position(|l| l.contains("\"category_id\": 1,"))
        .unwrap()
        + 1;
    assert!(
        e.contains(&format!("cells.json:{line}:")),
        "{e} (line {line})"
    );
    let e = err(good.replacen("\"file_name\": \"1.jpg\"", "\"file_name\": \"gone.jpg\"", 1));
    assert!(
        e.contains("cells.json:3: image") && e.contains("not found"),
        "{e}"
    );
    let e = err(good.replacen("\"bbox\": [", "\"bbox\": [900", 1));
    assert!(e.contains("cells.json:9: label at"), "{e}");
    let e = err(good.replacen("\"image_id\": 0", "\"image_id\": 7", 1));
    assert!(e.contains("annotation of unknown image id 7"), "{e}");
    let e = err(good[..good.len() / 2].to_string());
    assert!(e.contains("not a COCO file"), "{e}");
}

#[test]
fn point_refusals_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("set");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    std::fs::copy(samples().join("images/1.jpg"), dir.join("images/1.jpg")).unwrap();
    let err = |labels: &str| {
        std::fs::write(dir.join("labels/1.txt"), labels).unwrap();
        read_point_set(&dir, &names()).unwrap_err().to_string()
    };
    let e = err("10 10 0\n700 10 0\n");
    assert!(
        e.contains("1.txt:2: label at (700, 10) lies outside"),
        "{e}"
    );
    let e = err("10 10 0\n# note\n10 10 13\n");
    assert!(e.contains("1.txt:3: unknown class id 13"), "{e}");
    let e = err("10 10\n");
    assert!(e.contains("1.txt:1: malformed"), "{e}");
    std::fs::write(dir.join("labels/1.txt"), "10 10 0\n").unwrap();
    std::fs::write(dir.join("labels/9.txt"), "10 10 0\n").unwrap();
    let e = read_point_set(&dir, &names()).unwrap_err().to_string();
    assert!(e.contains("9.txt: label file has no image"), "{e}");
    std::fs::remove_file(dir.join("labels/9.txt")).unwrap();
    // The labels' line numbers skip nothing.
    std::fs::write(dir.join("labels/1.txt"), "# head\n\n10 10 4\n").unwrap();
    let f = read_point_set(&dir, &names()).unwrap();
    assert_eq!(
        (f[0].labels[0].line, f[0].labels[0].class.as_str()),
        (3, "target_cell")
    );
}

#[test]
fn class_maps_rename_drop_and_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let map = tmp.path().join("map.txt");
    let fields = read_point_set(&samples(), &names()).unwrap();
    // Everything but normal cells dropped, normal renamed.
    let mut text = String::from("# keep normal cells only\nnormal = discocyte\n");
    for n in &CHULA_CLASSES[1..] {
        text += &format!("{n} = -\n");
    }
    std::fs::write(&map, &text).unwrap();
    let mut cfg = ImportConfig::new(tmp.path().join("out"));
    cfg.class_map = Some(ClassMap::read(&map).unwrap());
    let s = import_fields(&fields, &cfg, |_, _| {}).unwrap();
    let classes: BTreeSet<String> = csv_rows(&cfg.out).into_iter().map(|r| r.3).collect();
    assert_eq!(classes, BTreeSet::from(["discocyte".to_string()]));
    assert!(s.dropped[&Dropped::ClassDropped] > 0);
    // A class the map does not name: refused at its label, before anything is written.
    std::fs::write(&map, "normal = discocyte\n").unwrap();
    cfg.class_map = Some(ClassMap::read(&map).unwrap());
    cfg.out = tmp.path().join("out2");
    let e = import_fields(&fields, &cfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(".txt:") && e.contains("is not in") && e.contains("map.txt"),
        "{e}"
    );
    assert!(!cfg.out.exists(), "nothing written");
    // Malformed map lines.
    std::fs::write(&map, "normal = a\nspherocyte\n").unwrap();
    let e = ClassMap::read(&map).unwrap_err().to_string();
    assert!(e.contains("map.txt:2: expected `from = to`"), "{e}");
    std::fs::write(&map, "normal = a\nnormal = b\n").unwrap();
    let e = ClassMap::read(&map).unwrap_err().to_string();
    assert!(
        e.contains("map.txt:2: class \"normal\" mapped twice"),
        "{e}"
    );
    // Class names files.
    let names_file = tmp.path().join("classes.txt");
    std::fs::write(&names_file, "a\nb\n\nc\n").unwrap();
    let e = labelled::read_class_names(&names_file)
        .unwrap_err()
        .to_string();
    assert!(e.contains("classes.txt:3:"), "{e}");
}

#[test]
fn class_folder_crops_keep_fields_together() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("crops");
    for class in ["normal", "spherocyte", "echinocyte"] {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for field in 0..6 {
            for n in 0..3 {
                image::RgbImage::from_pixel(20, 20, image::Rgb([field * 40, n * 50, 99]))
                    .save(src.join(class).join(format!("f{field}_{n}.png")))
                    .unwrap();
            }
        }
    }
    std::fs::write(src.join("notes.txt"), "not a crop").unwrap();
    let crops = read_crop_folders(&src, Some("_")).unwrap();
    assert_eq!(crops.len(), 3 * 6 * 3);
    assert_eq!(crops[0].1, "f0");
    let map = tmp.path().join("map.txt");
    std::fs::write(
        &map,
        "normal = normal\nspherocyte = spherocyte\nechinocyte = burr_cell\n",
    )
    .unwrap();
    let mut cfg = ImportConfig::new(tmp.path().join("out"));
    cfg.scheme = Scheme::Folds(3);
    cfg.class_map = Some(ClassMap::read(&map).unwrap());
    let s = import_crops(&crops, &cfg, |_, _| {}).unwrap();
    assert_eq!((s.crops, s.fields), (54, 6));
    let rows = csv_rows(&cfg.out);
    let classes: BTreeSet<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    assert_eq!(
        classes,
        BTreeSet::from(["burr_cell", "normal", "spherocyte"])
    );
    for (file, field, part, _) in &rows {
        assert_eq!(part, &format!("fold{}", labelled::fold_of(field, 3)));
        assert!(cfg.out.join(file).is_file());
    }
    let e = read_crop_folders(&tmp.path().join("out/crops.csv"), None);
    assert!(e.is_err());
}
