//! AdamW with DINOv2's per-parameter groups (layer-wise lr decay, patch-embed lr multiplier,
//! no weight decay on biases, norms and LayerScale gammas, the last layer on its own lr
//! schedule), per-module gradient clipping and the teacher EMA.
//!
//! The update is PyTorch's single-tensor AdamW, step for step, and its state (moments, step
//! count) is saved with checkpoints so that a resumed run continues bit for bit.

use std::collections::BTreeMap;

use crate::bail;
use crate::error::Result;
use tch::{Kind, Tensor};

/// One parameter with its schedule multipliers.
pub struct Param {
    pub name: String,
    pub var: Tensor,
    pub lr_mult: f64,
    pub wd_mult: f64,
    pub is_last_layer: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW hyper-parameters that do not change during a run.
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// DINOv2's `get_vit_lr_decay_rate`: blocks get `decay^(depth - i)`, the embeddings
/// `decay^(depth + 1)`, everything else (final norm, head) 1.
pub fn lr_decay_rate(name: &str, decay: f64, depth: usize) -> f64 {
    let mut layer_id = depth + 1;
    if let Some(rest) = name.strip_prefix("backbone.") {
        if rest.starts_with("pos_embed")
            || rest.starts_with("patch_embed")
            || rest.starts_with("mask_token")
            || rest.starts_with("cls_token")
            || rest.starts_with("reg_token")
        {
            layer_id = 0;
        } else if let Some(b) = rest.strip_prefix("blocks.") {
            if let Some(i) = b.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                layer_id = i + 1;
            }
        }
    }
    decay.powi((depth + 1 - layer_id) as i32)
}

/// Weight decay multiplier: 0 for biases, norms and LayerScale gammas (DINOv2's rule).
pub fn wd_multiplier(name: &str) -> f64 {
    if name.ends_with(".bias") || name.contains("norm") || name.contains("gamma") {
        0.0
    } else {
        1.0
    }
}

/// The optimiser over a named parameter set (`backbone.*`, `dino_head.*`).
pub struct Optimizer {
    pub params: Vec<Param>,
    pub hp: AdamW,
    /// Completed updates.
    pub step: i64,
}

impl Optimizer {
    pub fn new(
        named: Vec<(String, Tensor)>,
        hp: AdamW,
        layer_decay: f64,
        patch_embed_lr_mult: f64,
        depth: usize,
    ) -> Optimizer {
        let params = named
            .into_iter()
            .map(|(name, var)| {
                let mut lr_mult = lr_decay_rate(&name, layer_decay, depth);
                if name.contains("patch_embed") {
                    lr_mult *= patch_embed_lr_mult;
                }
                Param {
                    wd_mult: wd_multiplier(&name),
                    is_last_layer: name.contains("last_layer"),
                    exp_avg: Tensor::zeros_like(&var),
                    exp_avg_sq: Tensor::zeros_like(&var),
                    lr_mult,
                    name,
                    var,
                }
            })
            .collect();
        Optimizer {
            params,
            hp,
            step: 0,
        }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Clips the gradients of the parameters whose name starts with `prefix` to a total L2
    /// norm of `max_norm` (torch's `clip_grad_norm_`); returns the norm before clipping.
    pub fn clip_grad_norm(&self, prefix: &str, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .filter(|p| p.name.starts_with(prefix))
                .map(|p| p.var.grad())
                .filter(|g| g.defined())
                .collect();
            if grads.is_empty() {
                return 0.0;
            }
            let norms: Vec<Tensor> = grads
                .iter()
                .map(|g| g.norm_scalaropt_dtype(2, Kind::Float))
                .collect();
            let total = Tensor::stack(&norms, 0).norm_scalaropt_dtype(2, Kind::Float);
            let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
            for g in &grads {
                let _ = g.shallow_clone().g_mul_(&coef);
            }
            total.double_value(&[])
        })
    }

    /// One AdamW update with the scheduled values.
    pub fn update(&mut self, lr: f64, last_layer_lr: f64, wd: f64) {
        self.step += 1;
        let t = self.step as i32;
        let AdamW { beta1, beta2, eps } = self.hp;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.var.grad();
                if !g.defined() {
                    continue;
                }
                let lr = if p.is_last_layer { last_layer_lr } else { lr } * p.lr_mult;
                let wd = wd * p.wd_mult;
                // In place, as torch's single-tensor AdamW: two temporaries per parameter.
                let mut var = p.var.shallow_clone();
                let _ = var.g_mul_scalar_(1.0 - lr * wd);
                let _ = p.exp_avg.lerp_(&g, 1.0 - beta1);
                let _ = p.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = p.exp_avg_sq.addcmul_(&g, &(&g * (1.0 - beta2)));
                let step_size = lr / bc1;
                if step_size == 0.0 {
                    continue;
                }
                // denom = (sqrt(v) / sqrt(bc2) + eps) * (-1 / step_size); var += m / denom
                let mut denom = p.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bc2.sqrt());
                let _ = denom.g_add_scalar_(eps);
                let _ = denom.g_mul_scalar_(-1.0 / step_size);
                let _ = var.addcdiv_(&p.exp_avg, &denom);
            }
        });
    }

    /// Moments by parameter name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for p in &self.params {
            v.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            v.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        v
    }

    /// Restores the moments saved by [`Optimizer::state`].
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: i64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                for (key, dst) in [
                    (format!("exp_avg.{}", p.name), &mut p.exp_avg),
                    (format!("exp_avg_sq.{}", p.name), &mut p.exp_avg_sq),
                ] {
                    let Some(src) = state.get(&key) else {
                        bail!("optimizer state has no `{key}`");
                    };
                    if src.size() != dst.size() {
                        bail!(
                            "optimizer state `{key}` has shape {:?}, expected {:?}",
                            src.size(),
                            dst.size()
                        );
                    }
                    dst.copy_(src);
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Teacher EMA: `teacher = teacher * m + student * (1 - m)` for every pair.
pub fn ema_update(teacher: &[Tensor], student: &[Tensor], momentum: f64) {
    tch::no_grad(|| {
        for (t, s) in teacher.iter().zip(student) {
            let _ = t.shallow_clone().lerp_(s, 1.0 - momentum);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_rules_match_dinov2() {
        assert_eq!(wd_multiplier("backbone.blocks.0.attn.qkv.bias"), 0.0);
        assert_eq!(wd_multiplier("backbone.blocks.3.norm1.weight"), 0.0);
        assert_eq!(wd_multiplier("backbone.blocks.3.ls1.gamma"), 0.0);
        assert_eq!(wd_multiplier("backbone.blocks.3.mlp.fc1.weight"), 1.0);
        assert_eq!(wd_multiplier("backbone.pos_embed"), 1.0);
        assert_eq!(wd_multiplier("dino_head.last_layer.weight_g"), 1.0);
        // 12 blocks, decay 0.9: block 11 -> 0.9^1, block 0 -> 0.9^12, embeddings 0.9^13.
        let d = |n: &str| lr_decay_rate(n, 0.9, 12);
        assert!((d("backbone.blocks.11.mlp.fc1.weight") - 0.9).abs() < 1e-12);
        assert!((d("backbone.blocks.0.mlp.fc1.weight") - 0.9f64.powi(12)).abs() < 1e-12);
        assert!((d("backbone.pos_embed") - 0.9f64.powi(13)).abs() < 1e-12);
        assert_eq!(d("backbone.norm.weight"), 1.0);
        assert_eq!(d("dino_head.mlp.0.weight"), 1.0);
    }

    #[test]
    fn ema_is_the_convex_combination() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let s = Tensor::from_slice(&[3.0f32, 2.0, -1.0]);
        ema_update(&[t.shallow_clone()], &[s], 0.75);
        let got = Vec::<f32>::try_from(&t).unwrap();
        assert_eq!(got, vec![1.5, 2.0, 2.0]);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        // One parameter, two steps, lr 0.1, wd 0.5; grads 1 then -2 (hand-computed with
        // torch.optim.AdamW's formulas).
        let x = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
        let mut opt = Optimizer::new(
            vec![("backbone.blocks.0.mlp.fc1.weight".into(), x.shallow_clone())],
            AdamW::default(),
            1.0,
            1.0,
            1,
        );
        let mut want = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, g) in [(1, 1.0f64), (2, -2.0)] {
            opt.zero_grad();
            (&x * g).sum(Kind::Double).backward();
            opt.update(0.1, 0.1, 0.5);
            want *= 1.0 - 0.1 * 0.5;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = (v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8;
            want -= 0.1 * mh / vh;
            assert!((x.double_value(&[0]) - want).abs() < 1e-12, "step {t}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let a = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        let opt = Optimizer::new(
            vec![("backbone.x.weight".into(), a.shallow_clone())],
            AdamW::default(),
            1.0,
            1.0,
            1,
        );
        (&a * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        let n = opt.clip_grad_norm("backbone.", 1.0);
        assert!((n - 5.0).abs() < 1e-5);
        let g = Vec::<f32>::try_from(a.grad()).unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
    }
}
