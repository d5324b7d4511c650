//! DINOv2's projection head: a 3-layer MLP (GELU) to a bottleneck, L2 normalisation, and a
//! weight-normalised linear layer onto the prototypes (no bias, `weight_g` initialised to 1).
//! Variable names follow DINOv2: `mlp.{0,2,4}`, `last_layer.weight_g`, `last_layer.weight_v`.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Head dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Hidden width of the MLP (DINOv2: 2048).
    pub hidden_dim: usize,
    /// Bottleneck width before the prototypes (DINOv2: 256).
    pub bottleneck_dim: usize,
    /// Number of prototypes (RedDino: 131072).
    pub prototypes: usize,
    /// MLP layers (DINOv2: 3).
    pub layers: usize,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            hidden_dim: 2048,
            bottleneck_dim: 256,
            prototypes: 131_072,
            layers: 3,
        }
    }
}

/// The DINO head.
#[derive(Debug)]
pub struct DinoHead {
    mlp: Vec<nn::Linear>,
    /// Direction of the prototypes, [K, bottleneck].
    pub weight_v: Tensor,
    /// Per-prototype norm, [K, 1].
    pub weight_g: Tensor,
}

impl DinoHead {
    /// A freshly initialised head (MLP initialised as the ViT's linear layers: N(0, 0.02), zero
    /// biases).
    pub fn new(p: &nn::Path, in_dim: usize, cfg: &HeadConfig) -> DinoHead {
        let layers = cfg.layers.max(1);
        let mut dims = vec![in_dim as i64];
        for _ in 1..layers {
            dims.push(cfg.hidden_dim as i64);
        }
        dims.push(cfg.bottleneck_dim as i64);
        let mlp = (0..layers)
            .map(|i| crate::vit::linear(p / "mlp" / (2 * i), dims[i], dims[i + 1]))
            .collect();
        let last = p / "last_layer";
        let k = cfg.prototypes as i64;
        let b = cfg.bottleneck_dim as i64;
        // nn.Linear's default init (kaiming uniform, a=sqrt(5)): U(-1/sqrt(b), 1/sqrt(b)).
        let bound = 1.0 / (b as f64).sqrt();
        let weight_v = last.var(
            "weight_v",
            &[k, b],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let weight_g = last.var("weight_g", &[k, 1], nn::Init::Const(1.0));
        DinoHead {
            mlp,
            weight_v,
            weight_g,
        }
    }

    /// Bottleneck features after the L2 normalisation, [*, bottleneck].
    pub fn bottleneck(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        let n = self.mlp.len();
        for (i, l) in self.mlp.iter().enumerate() {
            h = l.forward(&h);
            if i + 1 < n {
                h = h.gelu("none");
            }
        }
        let eps = if h.kind() == Kind::Half { 1e-6 } else { 1e-12 };
        let norm = h.norm_scalaropt_dim(2, [-1], true).clamp_min(eps);
        h / norm
    }
}

impl Module for DinoHead {
    /// Prototype scores, [*, K].
    fn forward(&self, x: &Tensor) -> Tensor {
        let z = self.bottleneck(x);
        let w = Tensor::internal_weight_norm(&self.weight_v, &self.weight_g, 0);
        z.linear::<Tensor>(&w, None)
    }
}
