//! The ONNX graph (opset 17) of a RedDino ViT with an optional linear head.
//!
//! Input `pixels` `[N, 3, S, S]` f32 (N dynamic); outputs `embedding` `[N, D]` (the CLS token
//! after the final norm) and, with a head, `logits` `[N, C]`. Initializers carry the timm key
//! names (`blocks.{i}.attn.qkv.weight`), so a graph and its checkpoint read side by side.
//!
//! With test-time views ([`export_with_views`]) the graph also turns each crop through its
//! quarter turns (4 views) or its quarter turns and their mirror images (8), runs the ViT on
//! every view and averages the logits; `embedding` stays the crop's own (view 0).

use prost::Message;
use tract_onnx::pb;

use crate::arch::{LN_EPS, PATCH_SIZE};
use crate::weights::{LinearHead, Tensor, VitWeights};
use crate::Error;

/// ONNX opset the writer targets.
pub const OPSET: i64 = 17;
/// Name of the graph input.
pub const INPUT: &str = "pixels";
/// Name of the embedding output.
pub const EMBEDDING: &str = "embedding";
/// Name of the logits output.
pub const LOGITS: &str = "logits";
/// Symbolic batch dimension.
pub const BATCH_DIM: &str = "N";

/// Builds nodes and initializers, naming intermediate values after the layer that makes them.
struct Graph {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Dim]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(v) => pb::tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Param(p) => pb::tensor_shape_proto::dimension::Value::DimParam(p.clone()),
            }),
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

impl Graph {
    fn f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn tensor(&mut self, name: &str, t: &Tensor) -> String {
        self.f32(name, &t.shape, &t.data)
    }

    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.f32(name, &[], &[v])
    }

    fn i64s(&mut self, name: &str, data: &[i64]) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.into(),
            dims: vec![data.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn i64_scalar(&mut self, name: &str, v: i64) -> String {
        self.initializers.push(pb::TensorProto {
            name: name.into(),
            dims: vec![],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name.into()
    }

    /// Adds a node whose single output is called `out`.
    fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        out: &str,
    ) -> String {
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            name: out.into(),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        out.into()
    }

    /// `x @ W^T + b` for a timm `Linear` at `prefix` (`weight` `[out, in]`, `bias` `[out]`).
    fn linear(&mut self, w: &VitWeights, prefix: &str, x: &str) -> Result<String, Error> {
        let weight = w.get(&format!("{prefix}.weight"))?;
        let bias = w.get(&format!("{prefix}.bias"))?;
        self.linear_raw(prefix, weight, bias, x)
    }

    fn linear_raw(
        &mut self,
        prefix: &str,
        weight: &Tensor,
        bias: &Tensor,
        x: &str,
    ) -> Result<String, Error> {
        let wn = self.tensor(&format!("{prefix}.weight"), weight);
        let bn = self.tensor(&format!("{prefix}.bias"), bias);
        let wt = self.op(
            "Transpose",
            &[&wn],
            vec![attr_ints("perm", &[1, 0])],
            &format!("{prefix}.weight_t"),
        );
        let mm = self.op("MatMul", &[x, &wt], vec![], &format!("{prefix}.matmul"));
        Ok(self.op("Add", &[&mm, &bn], vec![], prefix))
    }

    fn layer_norm(&mut self, w: &VitWeights, prefix: &str, x: &str) -> Result<String, Error> {
        let scale = self.tensor(
            &format!("{prefix}.weight"),
            w.get(&format!("{prefix}.weight"))?,
        );
        let bias = self.tensor(&format!("{prefix}.bias"), w.get(&format!("{prefix}.bias"))?);
        Ok(self.op(
            "LayerNormalization",
            &[x, &scale, &bias],
            vec![attr_int("axis", -1), attr_float("epsilon", LN_EPS)],
            prefix,
        ))
    }

    /// Exact (erf) GELU: `0.5 x (1 + erf(x / sqrt 2))`.
    fn gelu(&mut self, prefix: &str, x: &str) -> String {
        let inv_sqrt2 = self.scalar(
            &format!("{prefix}.inv_sqrt2"),
            std::f32::consts::FRAC_1_SQRT_2,
        );
        let one = self.scalar(&format!("{prefix}.one"), 1.0);
        let half = self.scalar(&format!("{prefix}.half"), 0.5);
        let s = self.op("Mul", &[x, &inv_sqrt2], vec![], &format!("{prefix}.scaled"));
        let e = self.op("Erf", &[&s], vec![], &format!("{prefix}.erf"));
        let p = self.op("Add", &[&e, &one], vec![], &format!("{prefix}.erf1"));
        let m = self.op("Mul", &[x, &p], vec![], &format!("{prefix}.xerf"));
        self.op("Mul", &[&m, &half], vec![], prefix)
    }

    fn attention(&mut self, w: &VitWeights, prefix: &str, x: &str) -> Result<String, Error> {
        let cfg = &w.config;
        let (t, d, h, hd) = (
            cfg.num_tokens() as i64,
            cfg.embed_dim as i64,
            cfg.num_heads as i64,
            cfg.head_dim() as i64,
        );
        let qkv = self.linear(w, &format!("{prefix}.qkv"), x)?;
        let shape = self.i64s(&format!("{prefix}.qkv_shape"), &[0, t, 3, h, hd]);
        let r = self.op(
            "Reshape",
            &[&qkv, &shape],
            vec![],
            &format!("{prefix}.qkv_split"),
        );
        // [N, T, 3, H, hd] -> [3, N, H, T, hd]
        let p = self.op(
            "Transpose",
            &[&r],
            vec![attr_ints("perm", &[2, 0, 3, 1, 4])],
            &format!("{prefix}.qkv_heads"),
        );
        let mut parts = Vec::new();
        for (i, n) in ["q", "k", "v"].iter().enumerate() {
            let idx = self.i64_scalar(&format!("{prefix}.{n}_index"), i as i64);
            parts.push(self.op(
                "Gather",
                &[&p, &idx],
                vec![attr_int("axis", 0)],
                &format!("{prefix}.{n}"),
            ));
        }
        let scale = self.scalar(&format!("{prefix}.scale"), (hd as f32).powf(-0.5));
        let q = self.op(
            "Mul",
            &[&parts[0], &scale],
            vec![],
            &format!("{prefix}.q_scaled"),
        );
        let kt = self.op(
            "Transpose",
            &[&parts[1]],
            vec![attr_ints("perm", &[0, 1, 3, 2])],
            &format!("{prefix}.k_t"),
        );
        let logits = self.op("MatMul", &[&q, &kt], vec![], &format!("{prefix}.scores"));
        let attn = self.op(
            "Softmax",
            &[&logits],
            vec![attr_int("axis", -1)],
            &format!("{prefix}.softmax"),
        );
        let o = self.op(
            "MatMul",
            &[&attn, &parts[2]],
            vec![],
            &format!("{prefix}.context"),
        );
        let o = self.op(
            "Transpose",
            &[&o],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
            &format!("{prefix}.context_t"),
        );
        let shape = self.i64s(&format!("{prefix}.merge_shape"), &[0, t, d]);
        let o = self.op(
            "Reshape",
            &[&o, &shape],
            vec![],
            &format!("{prefix}.merged"),
        );
        self.linear(w, &format!("{prefix}.proj"), &o)
    }

    fn layer_scale(&mut self, w: &VitWeights, key: &str, x: &str) -> Result<String, Error> {
        if !w.config.layer_scale {
            return Ok(x.into());
        }
        let g = self.tensor(&format!("{key}.gamma"), w.get(&format!("{key}.gamma"))?);
        Ok(self.op("Mul", &[x, &g], vec![], key))
    }

    fn block(&mut self, w: &VitWeights, i: usize, x: &str) -> Result<String, Error> {
        let b = format!("blocks.{i}");
        let n1 = self.layer_norm(w, &format!("{b}.norm1"), x)?;
        let a = self.attention(w, &format!("{b}.attn"), &n1)?;
        let a = self.layer_scale(w, &format!("{b}.ls1"), &a)?;
        let x = self.op("Add", &[x, &a], vec![], &format!("{b}.residual1"));
        let n2 = self.layer_norm(w, &format!("{b}.norm2"), &x)?;
        let h = self.linear(w, &format!("{b}.mlp.fc1"), &n2)?;
        let h = self.gelu(&format!("{b}.mlp.act"), &h);
        let m = self.linear(w, &format!("{b}.mlp.fc2"), &h)?;
        let m = self.layer_scale(w, &format!("{b}.ls2"), &m)?;
        Ok(self.op("Add", &[&x, &m], vec![], &format!("{b}.residual2")))
    }

    /// The input's `views` turned and mirrored copies, stacked along the batch: `[V * N, 3, S,
    /// S]`, view `k` turned `k % 4` quarter turns (`torch.rot90(x, k, [2, 3])`) and mirrored
    /// left to right when `k >= 4`.
    fn views(&mut self, s: usize, views: usize) -> String {
        let reversed: Vec<i64> = (0..s as i64).rev().collect();
        let rev = self.i64s("views.reversed", &reversed);
        let mirror = |g: &mut Self, x: &str, name: &str| {
            g.op("Gather", &[x, &rev], vec![attr_int("axis", 3)], name)
        };
        // rot90(x, 1, [2, 3]) = the transpose of the image mirrored left to right.
        let turn = |g: &mut Self, x: &str, k: usize| {
            let m = mirror(g, x, &format!("views.turn{k}.mirrored"));
            g.op(
                "Transpose",
                &[&m],
                vec![attr_ints("perm", &[0, 1, 3, 2])],
                &format!("views.turn{k}"),
            )
        };
        let mut all = vec![INPUT.to_string()];
        for k in 1..4 {
            let prev = all[k - 1].clone();
            all.push(turn(self, &prev, k));
        }
        if views == 8 {
            for k in 0..4 {
                let x = all[k].clone();
                all.push(mirror(self, &x, &format!("views.mirror{k}")));
            }
        }
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.op("Concat", &refs, vec![attr_int("axis", 0)], "views")
    }

    /// `[1, k, D]` token(s) broadcast to `[N, k, D]`.
    fn expand_tokens(
        &mut self,
        name: &str,
        tokens: &str,
        k: usize,
        d: usize,
        batch: &str,
    ) -> String {
        let tail = self.i64s(&format!("{name}.shape_tail"), &[k as i64, d as i64]);
        let shape = self.op(
            "Concat",
            &[batch, &tail],
            vec![attr_int("axis", 0)],
            &format!("{name}.shape"),
        );
        self.op(
            "Expand",
            &[tokens, &shape],
            vec![],
            &format!("{name}.expanded"),
        )
    }
}

/// Writes the ONNX model of `weights` at its configured input size, with an optional head.
pub fn export(weights: &VitWeights, head: Option<&LinearHead>) -> Result<Vec<u8>, Error> {
    export_with_views(weights, head, 1)
}

/// The view counts a graph may average its logits over: the crop alone, its four quarter
/// turns, or those and their mirror images.
pub const VIEW_COUNTS: [usize; 3] = [1, 4, 8];

/// Checks a test-time view count (one of [`VIEW_COUNTS`]).
pub fn check_views(views: usize) -> Result<(), Error> {
    if VIEW_COUNTS.contains(&views) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{views} test-time views: a model averages 1 (the crop alone), 4 (its quarter turns) or 8 (its quarter turns and their mirror images)"
        )))
    }
}

/// [`export`], the logits averaged over `views` turned and mirrored copies of each crop
/// ([`VIEW_COUNTS`]; view `k` is the crop turned `k % 4` quarter turns, mirrored left to right
/// when `k >= 4`).
pub fn export_with_views(
    weights: &VitWeights,
    head: Option<&LinearHead>,
    views: usize,
) -> Result<Vec<u8>, Error> {
    let cfg = &weights.config;
    cfg.validate()?;
    check_views(views)?;
    if let Some(h) = head {
        h.validate(cfg.embed_dim)?;
    }
    if views > 1 && head.is_none() {
        return Err(Error::Config(
            "test-time views average a head's logits: give the head".into(),
        ));
    }
    let d = cfg.embed_dim;
    let s = cfg.img_size;
    let p = cfg.num_patches();
    let mut g = Graph {
        nodes: vec![],
        initializers: vec![],
    };

    // Patch embedding: Conv 14x14 stride 14 -> [N, D, g, g] -> [N, P, D].
    let pw = g.tensor(
        "patch_embed.proj.weight",
        weights.get("patch_embed.proj.weight")?,
    );
    let pb_ = g.tensor(
        "patch_embed.proj.bias",
        weights.get("patch_embed.proj.bias")?,
    );
    let input = if views > 1 {
        g.views(s, views)
    } else {
        INPUT.to_string()
    };
    let conv = g.op(
        "Conv",
        &[&input, &pw, &pb_],
        vec![
            attr_ints("kernel_shape", &[PATCH_SIZE as i64; 2]),
            attr_ints("strides", &[PATCH_SIZE as i64; 2]),
        ],
        "patch_embed.proj",
    );
    let flat_shape = g.i64s("patch_embed.flat_shape", &[0, d as i64, p as i64]);
    let flat = g.op("Reshape", &[&conv, &flat_shape], vec![], "patch_embed.flat");
    let patches = g.op(
        "Transpose",
        &[&flat],
        vec![attr_ints("perm", &[0, 2, 1])],
        "patch_embed",
    );

    // Position embedding: the CLS token's entry (if any) is added to the CLS token; the grid
    // entries to the patches. Register tokens carry no position.
    let pos = weights.get("pos_embed")?;
    let prefix = weights.pos_prefix();
    let pos_patches = g.f32("pos_embed.patches", &[1, p, d], &pos.data[prefix * d..]);
    let patches = g.op("Add", &[&patches, &pos_patches], vec![], "patch_tokens");
    let cls = g.tensor("cls_token", weights.get("cls_token")?);
    let cls = if prefix == 1 {
        let pos_cls = g.f32("pos_embed.cls", &[1, 1, d], &pos.data[..d]);
        g.op("Add", &[&cls, &pos_cls], vec![], "cls_token.positioned")
    } else {
        cls
    };
    let batch = g.op(
        "Shape",
        &[&input],
        vec![attr_int("start", 0), attr_int("end", 1)],
        "batch_size",
    );
    let mut seq = vec![g.expand_tokens("cls_token", &cls, 1, d, &batch)];
    if cfg.num_registers > 0 {
        let reg = g.tensor("reg_token", weights.get("reg_token")?);
        seq.push(g.expand_tokens("reg_token", &reg, cfg.num_registers, d, &batch));
    }
    seq.push(patches);
    let seq_refs: Vec<&str> = seq.iter().map(String::as_str).collect();
    let mut x = g.op("Concat", &seq_refs, vec![attr_int("axis", 1)], "tokens");

    for i in 0..cfg.depth {
        x = g.block(weights, i, &x)?;
    }
    let normed = g.layer_norm(weights, "norm", &x)?;
    let cls_idx = g.i64_scalar("cls_index", 0);
    let cls_name = if views > 1 { "cls_views" } else { EMBEDDING };
    let cls_out = g.op(
        "Gather",
        &[&normed, &cls_idx],
        vec![attr_int("axis", 1)],
        cls_name,
    );
    if views > 1 {
        // [V * N, D] -> [V, N, D]: the crops' own view is the first.
        let shape = g.i64s("cls_views.shape", &[views as i64, -1, d as i64]);
        let by_view = g.op("Reshape", &[&cls_out, &shape], vec![], "cls_by_view");
        let first = g.i64_scalar("view_index", 0);
        g.op(
            "Gather",
            &[&by_view, &first],
            vec![attr_int("axis", 0)],
            EMBEDDING,
        );
    }

    let batch_dim = Dim::Param(BATCH_DIM.into());
    let mut outputs = vec![value_info(
        EMBEDDING,
        &[batch_dim.clone(), Dim::Fixed(d as i64)],
    )];
    let mut metadata = vec![pb::StringStringEntryProto {
        key: "reddino.config".into(),
        value: serde_json::to_string(cfg).expect("config serialises"),
    }];
    if let Some(h) = head {
        let c = h.class_names.len() as i64;
        if views > 1 {
            let logits = g.linear_raw("head", &h.weight, &h.bias, &cls_out)?;
            let shape = g.i64s("logits_views.shape", &[views as i64, -1, c]);
            let by_view = g.op("Reshape", &[&logits, &shape], vec![], "logits_by_view");
            g.op(
                "ReduceMean",
                &[&by_view],
                vec![attr_ints("axes", &[0]), attr_int("keepdims", 0)],
                LOGITS,
            );
        } else {
            let logits = g.linear_raw("head", &h.weight, &h.bias, EMBEDDING)?;
            g.op("Identity", &[&logits], vec![], LOGITS);
        }
        outputs.push(value_info(
            LOGITS,
            &[batch_dim.clone(), Dim::Fixed(h.class_names.len() as i64)],
        ));
        metadata.push(pb::StringStringEntryProto {
            key: "reddino.class_names".into(),
            value: serde_json::to_string(&h.class_names).expect("names serialise"),
        });
    }

    let graph = pb::GraphProto {
        node: g.nodes,
        name: "reddino_vit".into(),
        initializer: g.initializers,
        input: vec![value_info(
            INPUT,
            &[
                batch_dim,
                Dim::Fixed(3),
                Dim::Fixed(s as i64),
                Dim::Fixed(s as i64),
            ],
        )],
        output: outputs,
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "reddino-models".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata,
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Param(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Param(p) => write!(f, "{p}"),
        }
    }
}

/// Names and shapes of a graph's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphIo {
    pub inputs: Vec<(String, Vec<Dim>)>,
    pub outputs: Vec<(String, Vec<Dim>)>,
}

impl GraphIo {
    /// Shape of the input or output called `name`.
    pub fn shape(&self, name: &str) -> Option<&[Dim]> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
    }
}

/// Reads the inputs and outputs (without initializers) of an ONNX model.
pub fn graph_io(bytes: &[u8]) -> Result<GraphIo, Error> {
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| Error::Onnx(format!("not an ONNX model: {e}")))?;
    let graph = model
        .graph
        .ok_or_else(|| Error::Onnx("model has no graph".into()))?;
    let inits: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let dims = |v: &pb::ValueInfoProto| -> Vec<Dim> {
        let Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(t)),
            ..
        }) = &v.r#type
        else {
            return vec![];
        };
        t.shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                            Dim::Fixed(*v)
                        }
                        Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                            Dim::Param(p.clone())
                        }
                        None => Dim::Param("?".into()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(GraphIo {
        inputs: graph
            .input
            .iter()
            .filter(|i| !inits.contains(i.name.as_str()))
            .map(|i| (i.name.clone(), dims(i)))
            .collect(),
        outputs: graph
            .output
            .iter()
            .map(|o| (o.name.clone(), dims(o)))
            .collect(),
    })
}
