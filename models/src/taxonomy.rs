//! The project's default cell classes (see TAXONOMY.md). Deployments bring their own list in
//! their bundle; only this crate names these.

/// Default class names, by id.
pub const DEFAULT_CLASSES: [&str; 13] = [
    "discocyte",
    "spherocyte",
    "elliptocyte",
    "target_cell",
    "stomatocyte",
    "echinocyte",
    "acanthocyte",
    "dacrocyte",
    "schistocyte",
    "drepanocyte",
    "parasitized",
    "wbc",
    "platelet",
];

/// Ids 0..=10 are red cells (the denominator of parasitemia).
pub const RBC_CLASSES: std::ops::RangeInclusive<usize> = 0..=10;
/// Id of the parasitized class.
pub const PARASITIZED: usize = 10;
/// Id of white blood cells.
pub const WBC: usize = 11;
/// Id of platelets.
pub const PLATELET: usize = 12;

/// Default class names as owned strings.
pub fn default_class_names() -> Vec<String> {
    DEFAULT_CLASSES.iter().map(|s| s.to_string()).collect()
}
