//! Temperature scaling of a classifier's logits (Guo et al., "On Calibration of Modern Neural
//! Networks", 2017): the one temperature that, dividing every logit, gives held-out crops the
//! lowest log loss. The classes a model gives do not change; its top probability comes to
//! mean how often it is right, which is what the edge's `min_confidence` compares it with.
//! The temperature is fitted on the cross-validation's out-of-fold logits (`finetune
//! --cross-validate` writes them to cv/logits.csv, [`read_cv_logits`]) and folded into the
//! head ([`reddino_models::weights::LinearHead::scaled`]).

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::bail;
use crate::error::{Context, Error, Result};

/// Held-out logits: one row per crop (the mean over its views), and its true class.
#[derive(Debug, Clone)]
pub struct HeldOutLogits {
    pub class_names: Vec<String>,
    pub logits: Vec<Vec<f64>>,
    pub truth: Vec<usize>,
}

/// What a temperature does to held-out logits.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// The logits are divided by it (below 1: the model was under-confident).
    pub temperature: f64,
    pub crops: usize,
    /// Mean negative log-likelihood of the true class, before and after.
    pub log_loss: [f64; 2],
    /// Expected calibration error over 15 equal-width confidence bins, before and after.
    pub calibration_error: [f64; 2],
    /// Share of the crops whose top probability is under 0.5 (`min_confidence`'s default),
    /// before and after.
    pub under_half: [f64; 2],
    /// Share of the crops whose top class is right (the same before and after).
    pub accuracy: f64,
}

/// Mean negative log-likelihood of the true classes with the logits divided by `t`.
pub fn log_loss(set: &HeldOutLogits, t: f64) -> f64 {
    let total: f64 = set
        .logits
        .iter()
        .zip(&set.truth)
        .map(|(z, &y)| {
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / t));
            let lse = m + z.iter().map(|&v| (v / t - m).exp()).sum::<f64>().ln();
            lse - z[y] / t
        })
        .sum();
    total / set.truth.len().max(1) as f64
}

/// Each crop's top probability and whether its top class is right, with the logits divided
/// by `t`.
fn confidences(set: &HeldOutLogits, t: f64) -> Vec<(f64, bool)> {
    set.logits
        .iter()
        .zip(&set.truth)
        .map(|(z, &y)| {
            let (top, zmax) =
                z.iter().enumerate().fold(
                    (0, f64::NEG_INFINITY),
                    |a, (i, &v)| if v > a.1 { (i, v) } else { a },
                );
            let sum: f64 = z.iter().map(|&v| ((v - zmax) / t).exp()).sum();
            (1.0 / sum, top == y)
        })
        .collect()
}

/// Expected calibration error of crops' (top probability, right) pairs over `bins`
/// equal-width bins of the top probability.
fn binned_error(c: &[(f64, bool)], bins: usize) -> f64 {
    let mut sums = vec![(0usize, 0.0f64, 0usize); bins];
    for &(p, right) in c {
        let b = ((p * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        sums[b].0 += 1;
        sums[b].1 += p;
        sums[b].2 += usize::from(right);
    }
    let n = c.len().max(1) as f64;
    sums.iter()
        .filter(|s| s.0 > 0)
        .map(|&(k, p, right)| (k as f64 / n) * (right as f64 / k as f64 - p / k as f64).abs())
        .sum()
}

/// The temperature of lowest log loss. The loss is convex in 1 / t, so a golden-section
/// search over 1 / t in 0.01..=100 finds it (to about 1e-9 relative).
pub fn fit_temperature(set: &HeldOutLogits) -> Result<f64> {
    if set.truth.is_empty() {
        bail!("no held-out logits to fit a temperature on");
    }
    let f = |inv: f64| log_loss(set, 1.0 / inv);
    let (mut a, mut b) = (0.01f64.ln(), 100f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (f(c.exp()), f(d.exp()));
    for _ in 0..80 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c.exp());
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d.exp());
        }
    }
    Ok(1.0 / ((a + b) / 2.0).exp())
}

/// Fits the temperature and measures it against the logits as they are.
pub fn calibrate(set: &HeldOutLogits) -> Result<Calibration> {
    let t = fit_temperature(set)?;
    let (before, after) = (confidences(set, 1.0), confidences(set, t));
    let n = before.len() as f64;
    let under = |c: &[(f64, bool)]| c.iter().filter(|(p, _)| *p < 0.5).count() as f64 / n;
    Ok(Calibration {
        temperature: t,
        crops: set.truth.len(),
        log_loss: [log_loss(set, 1.0), log_loss(set, t)],
        calibration_error: [binned_error(&before, 15), binned_error(&after, 15)],
        under_half: [under(&before), under(&after)],
        accuracy: before.iter().filter(|(_, right)| *right).count() as f64 / n,
    })
}

/// The first columns of cv/logits.csv; one column per class follows, named by the class.
const LOGITS_COLUMNS: [&str; 4] = ["file", "fold", "truth", "view"];

/// Writes the out-of-fold logits of a cross-validation as [`read_cv_logits`] reads them:
/// `logits[view][crop][class]`, with each crop's file, fold and true class.
pub fn write_cv_logits(
    path: &Path,
    class_names: &[String],
    files: &[std::path::PathBuf],
    fold_of: &[usize],
    truth: &[usize],
    logits: &[Vec<Vec<f32>>],
) -> Result<()> {
    use std::io::Write;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    writeln!(w, "{},{}", LOGITS_COLUMNS.join(","), class_names.join(","))?;
    for (v, rows) in logits.iter().enumerate() {
        for (i, row) in rows.iter().enumerate() {
            let vals: Vec<String> = row.iter().map(|x| format!("{x:.5}")).collect();
            let (file, fold, y) = (files[i].display(), fold_of[i], truth[i]);
            writeln!(w, "{file},{fold},{y},{v},{}", vals.join(","))?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads the out-of-fold logits `finetune --cross-validate` writes (cv/logits.csv:
/// `file,fold,truth,view,<class>...`), each crop's logits averaged over its first `views`
/// views, as a model exported with `--test-time-views` averages them. Every crop must have
/// those views; a malformed line is refused with its number.
pub fn read_cv_logits(path: &Path, views: usize) -> Result<HeldOutLogits> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h)
        .with_context(|| format!("{}: empty file", path.display()))?;
    let cols: Vec<&str> = header.split(',').collect();
    let n = LOGITS_COLUMNS.len();
    if cols.len() <= n || cols[..n] != LOGITS_COLUMNS {
        bail!(
            "{}: line 1: not a cross-validation logits file (expected `{},<class>...`)",
            path.display(),
            LOGITS_COLUMNS.join(",")
        );
    }
    let class_names: Vec<String> = cols[n..].iter().map(|s| s.to_string()).collect();
    let classes = class_names.len();
    let mut index: HashMap<String, usize> = HashMap::new();
    let (mut sums, mut counts, mut truth): (Vec<Vec<f64>>, Vec<usize>, Vec<usize>) =
        (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in lines {
        let bad = |what: &str| format!("{}: line {}: {what}", path.display(), i + 1);
        // The file name may hold commas: the numbers are the last 3 + classes fields.
        let fields: Vec<&str> = line.rsplitn(classes + 4, ',').collect();
        if fields.len() != classes + 4 {
            bail!("{}", bad(&format!("expected {} fields", classes + 4)));
        }
        let file = fields[classes + 3];
        let y: usize = fields[classes + 1]
            .parse()
            .map_err(|_| Error::Invalid(bad("bad truth")))?;
        let view: usize = fields[classes]
            .parse()
            .map_err(|_| Error::Invalid(bad("bad view")))?;
        if y >= classes {
            bail!(
                "{}",
                bad(&format!("truth {y} is not one of {classes} classes"))
            );
        }
        if view >= views {
            continue;
        }
        let mut z = Vec::with_capacity(classes);
        for v in fields[..classes].iter().rev() {
            let x: f64 = v
                .parse()
                .map_err(|_| Error::Invalid(bad(&format!("bad logit `{v}`"))))?;
            if !x.is_finite() {
                bail!("{}", bad("a logit that is not finite"));
            }
            z.push(x);
        }
        let k = *index.entry(file.to_string()).or_insert_with(|| {
            sums.push(vec![0.0; classes]);
            counts.push(0);
            truth.push(y);
            sums.len() - 1
        });
        if truth[k] != y {
            bail!("{}", bad(&format!("{file} has two true classes")));
        }
        sums[k].iter_mut().zip(&z).for_each(|(s, x)| *s += x);
        counts[k] += 1;
    }
    if sums.is_empty() {
        bail!("{}: no logits", path.display());
    }
    if let Some(k) = counts.iter().position(|&c| c != views) {
        bail!(
            "{}: a crop has {} of the {views} views asked for (the file holds fewer views than that?)",
            path.display(),
            counts[k]
        );
    }
    let logits = sums
        .into_iter()
        .map(|s| s.into_iter().map(|x| x / views as f64).collect())
        .collect();
    Ok(HeldOutLogits {
        class_names,
        logits,
        truth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Crops whose labels are drawn from softmax(z / t0): the fitted temperature is t0.
    fn drawn(t0: f64, n: usize) -> HeldOutLogits {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut logits, mut truth) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let z: Vec<f64> = (0..4).map(|_| rng.gen_range(-3.0..3.0)).collect();
            let e: Vec<f64> = z.iter().map(|v| (v / t0).exp()).collect();
            let mut u = rng.gen_range(0.0..e.iter().sum::<f64>());
            let mut y = 0;
            while y < 3 && u > e[y] {
                u -= e[y];
                y += 1;
            }
            logits.push(z);
            truth.push(y);
        }
        HeldOutLogits {
            class_names: (0..4).map(|i| i.to_string()).collect(),
            logits,
            truth,
        }
    }

    #[test]
    fn the_fitted_temperature_is_the_one_the_labels_were_drawn_with() {
        for t0 in [0.5, 1.0, 2.0] {
            let set = drawn(t0, 20_000);
            let t = fit_temperature(&set).unwrap();
            assert!((t / t0 - 1.0).abs() < 0.05, "drawn at {t0}, fitted {t}");
            // It is the minimum: a little either side is worse.
            assert!(log_loss(&set, t) < log_loss(&set, t * 1.1));
            assert!(log_loss(&set, t) < log_loss(&set, t / 1.1));
        }
    }

    #[test]
    fn calibration_lowers_the_error_of_an_under_confident_model() {
        // Labels drawn at 0.5: the logits as they are (1) are under-confident.
        let c = calibrate(&drawn(0.5, 20_000)).unwrap();
        assert!(c.temperature < 0.55);
        assert!(c.log_loss[1] < c.log_loss[0]);
        assert!(c.calibration_error[1] < 0.02, "{:?}", c.calibration_error);
        assert!(c.calibration_error[0] > 0.1, "{:?}", c.calibration_error);
        assert!(c.under_half[1] < c.under_half[0]);
    }

    #[test]
    fn logits_files_are_averaged_over_views_and_refused_when_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("logits.csv");
        let ok = "file,fold,truth,view,a,b\n\
                  x/1,0,1,0,1.0,3.0\n\
                  x/2,0,0,0,2.0,0.0\n\
                  x/1,0,1,1,3.0,1.0\n\
                  x/2,0,0,1,4.0,0.0\n";
        std::fs::write(&p, ok).unwrap();
        let one = read_cv_logits(&p, 1).unwrap();
        assert_eq!(one.logits, vec![vec![1.0, 3.0], vec![2.0, 0.0]]);
        let two = read_cv_logits(&p, 2).unwrap();
        assert_eq!(two.logits, vec![vec![2.0, 2.0], vec![3.0, 0.0]]);
        assert_eq!(two.truth, vec![1, 0]);
        assert_eq!(two.class_names, vec!["a", "b"]);
        let err = |text: &str, views: usize| {
            std::fs::write(&p, text).unwrap();
            read_cv_logits(&p, views).unwrap_err().to_string()
        };
        assert!(err(ok, 4).contains("views"));
        assert!(err("file,truth\nx,1\n", 1).contains("line 1"));
        assert!(err("file,fold,truth,view,a,b\nx/1,0,1,0,1.0\n", 1).contains("line 2"));
        assert!(err("file,fold,truth,view,a,b\nx/1,0,2,0,1.0,2.0\n", 1).contains("truth 2"));
        assert!(err("file,fold,truth,view,a,b\nx/1,0,1,0,1.0,zz\n", 1).contains("`zz`"));
        assert!(err("file,fold,truth,view,a,b\nx/1,0,1,0,1.0,NaN\n", 1).contains("finite"));
    }

    #[test]
    fn written_logits_read_back_averaged_over_views() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("logits.csv");
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let files = vec!["f0/a/x,1.png".into(), "f1/c/y.png".into()];
        let logits = vec![
            vec![vec![1.0, 2.0, 3.0], vec![-1.0, 0.5, 4.0]],
            vec![vec![3.0, 0.0, 1.0], vec![1.0, 1.5, 0.0]],
        ];
        write_cv_logits(&p, &names, &files, &[0, 1], &[0, 2], &logits).unwrap();
        let back = read_cv_logits(&p, 2).unwrap();
        assert_eq!(back.class_names, names);
        assert_eq!(back.truth, vec![0, 2]);
        assert_eq!(back.logits, vec![vec![2.0, 1.0, 2.0], vec![0.0, 1.0, 2.0]]);
        assert_eq!(
            read_cv_logits(&p, 1).unwrap().logits[1],
            vec![-1.0, 0.5, 4.0]
        );
    }
}
