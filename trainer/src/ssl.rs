//! The student/teacher pair and one DINOv2 training step on two global crops (DINOv2's
//! `SSLMetaArch.forward_backward` without local crops, as RedDino trains).

use crate::error::Result;
use reddino_models::arch::VitConfig;
use reddino_models::weights::VitWeights;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::PosResample;
use crate::distributed::ProcessGroup;
use crate::head::{DinoHead, HeadConfig};
use crate::loss::{dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp_across, Center};
use crate::vit::Vit;

/// How the teacher's scores become targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    /// Sinkhorn-Knopp, 3 iterations (RedDino).
    SinkhornKnopp,
    /// Running-mean centre with momentum 0.9 and a softmax (DINO).
    Centering,
}

/// Loss settings.
#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    pub student_temp: f64,
    pub dino_weight: f64,
    pub ibot_weight: f64,
    pub koleo_weight: f64,
    pub centering: Centering,
}

/// One network: backbone + DINO head, variables named `backbone.*` and `dino_head.*`.
pub struct Network {
    pub vs: nn::VarStore,
    pub backbone: Vit,
    pub head: DinoHead,
}

impl Network {
    pub fn new(
        device: Device,
        vit: &VitConfig,
        head: &HeadConfig,
        init: Option<&VitWeights>,
        resample: PosResample,
        layerscale_init: f64,
    ) -> Result<Network> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = match init {
            Some(w) => {
                Vit::from_weights_resampled(&(&root / "backbone"), w, vit.img_size, resample)?
            }
            None => {
                let vit = Vit::new(&(&root / "backbone"), vit, 1)?;
                vit.fill_layer_scale(layerscale_init);
                vit
            }
        };
        let head = DinoHead::new(&(&root / "dino_head"), vit.embed_dim, head);
        Ok(Network { vs, backbone, head })
    }

    /// Variables sorted by name (a stable order for the optimiser, EMA and checkpoints).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Tensors of one step's batch.
pub struct Batch {
    /// Global crops [2B, 3, S, S]: crop 1 of every image, then crop 2.
    pub crops: Tensor,
    /// iBOT masks [2B, N] (bool).
    pub masks: Tensor,
    /// Local crops [L*B, 3, s, s] (crop l of every image, then crop l+1), student only.
    pub locals: Option<Tensor>,
}

/// Loss values of one step.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StepLosses {
    pub total: f64,
    pub dino: f64,
    pub ibot: f64,
    pub koleo: f64,
}

/// DINOv2 forward on the teacher and the student; returns the total loss (with graph) and the
/// parts. `teacher_temp` is the scheduled temperature. With a process `group`, `batch` is this
/// rank's share: the teacher's centering (Sinkhorn-Knopp sums and counts, running means) is
/// taken over every rank's rows, as DINOv2 does; the losses are this rank's means (the
/// gradients are averaged afterwards). A failed collective is reported by `group.check()`.
pub fn forward_losses(
    student: &Network,
    teacher: &Network,
    batch: &Batch,
    teacher_temp: f64,
    cfg: &LossConfig,
    centers: &mut Option<(Center, Center)>,
    group: Option<&ProcessGroup>,
) -> (Tensor, StepLosses) {
    let n_images = batch.crops.size()[0];
    let b = n_images / 2;
    let masks_flat = batch.masks.flatten(0, 1);
    let mask_idx = masks_flat.nonzero().flatten(0, -1);
    let n_masked = mask_idx.size()[0];
    let world = group.map_or(1, |g| g.world) as i64;
    // The masked patches of every rank (DINOv2's all-reduced n_masked_patches).
    let n_masked_all = match group {
        Some(g) => {
            let t = Tensor::from_slice(&[n_masked as f64]).to_device(batch.crops.device());
            g.sum_in_place(&t);
            t.double_value(&[0]) as i64
        }
        None => n_masked,
    };
    // Each masked patch weighs 1 / (masked patches of its image).
    let per_image = batch
        .masks
        .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        .clamp_min(1.0);
    let weights = per_image
        .reciprocal()
        .expand_as(&batch.masks)
        .flatten(0, 1)
        .index_select(0, &mask_idx);

    // Teacher: no gradient; crop 1's target is crop 2's output and vice versa.
    let (t_cls, t_patch) = tch::no_grad(|| {
        let out = teacher.backbone.forward(&batch.crops, None, false);
        let cls = Tensor::cat(&[out.cls.narrow(0, b, b), out.cls.narrow(0, 0, b)], 0);
        let d = out.patches.size()[2];
        let patches = out.patches.reshape([-1, d]).index_select(0, &mask_idx);
        let heads = teacher.head.forward(&Tensor::cat(&[&cls, &patches], 0));
        let cls_h = heads.narrow(0, 0, n_images);
        let patch_h = heads.narrow(0, n_images, n_masked);
        match (cfg.centering, centers.as_mut()) {
            (Centering::Centering, Some((c_dino, c_ibot))) => {
                let c = c_dino.softmax_centered(&cls_h, teacher_temp);
                c_dino.update_across(&cls_h, group);
                let p = c_ibot.softmax_centered(&patch_h, teacher_temp);
                if n_masked_all > 0 {
                    c_ibot.update_across(&patch_h, group);
                }
                (c, p)
            }
            _ => (
                sinkhorn_knopp_across(&cls_h, teacher_temp, 3, (n_images * world) as f64, group),
                sinkhorn_knopp_across(&patch_h, teacher_temp, 3, n_masked_all.max(1) as f64, group),
            ),
        }
    });

    let out = student
        .backbone
        .forward(&batch.crops, Some(&batch.masks), true);
    let d = out.patches.size()[2];
    let s_patches = out.patches.reshape([-1, d]).index_select(0, &mask_idx);
    let heads = student
        .head
        .forward(&Tensor::cat(&[&out.cls, &s_patches], 0));
    let s_cls_h = heads.narrow(0, 0, n_images);
    let s_patch_h = heads.narrow(0, n_images, n_masked);

    // DINOv2's scaling: the global term counts 2 pairs, each local crop 2 more.
    let n_local = batch.locals.as_ref().map(|l| l.size()[0] / b).unwrap_or(0);
    let terms = 2.0 + 2.0 * n_local as f64;
    let mut dino = dino_loss(&s_cls_h, &t_cls, cfg.student_temp) * (2.0 / terms);
    if let Some(locals) = &batch.locals {
        let l_cls = student.backbone.forward(locals, None, true).cls;
        let l_h = student.head.forward(&l_cls);
        for l in 0..n_local {
            let s = l_h.narrow(0, l * b, b);
            for g in 0..2 {
                dino += dino_loss(&s, &t_cls.narrow(0, g * b, b), cfg.student_temp) / terms;
            }
        }
    }
    let ibot = if n_masked > 0 {
        ibot_loss(&s_patch_h, &t_patch, &weights, n_images, cfg.student_temp)
    } else {
        Tensor::zeros([], (Kind::Float, out.cls.device()))
    };
    let mut total = &dino * cfg.dino_weight + &ibot * cfg.ibot_weight;
    let mut koleo_v = 0.0;
    if cfg.koleo_weight > 0.0 {
        let k = koleo_loss(&out.cls.narrow(0, 0, b)) + koleo_loss(&out.cls.narrow(0, b, b));
        koleo_v = k.double_value(&[]);
        total += k * cfg.koleo_weight;
    }
    let parts = StepLosses {
        total: total.double_value(&[]),
        dino: dino.double_value(&[]),
        ibot: ibot.double_value(&[]),
        koleo: koleo_v,
    };
    (total, parts)
}
