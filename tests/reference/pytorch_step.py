"""The trainer's step in plain PyTorch (the reference the step benchmark compares against).

Same model (timm's DINOv2 ViT with a mask token), same DINO head, same losses (DINOv2's
formulas from dinov2_losses.py), AdamW with DINOv2's parameter groups, per-module gradient
clipping, teacher EMA: what `Trainer::optimize` does, on the same input sizes and threads.
Prints one JSON line: {"ms_per_step": ..., "steps": ..., "threads": ...}.

Usage: python pytorch_step.py --embed-dim 192 --depth 4 --heads 3 --img 112 --batch 16 \
           --hidden 512 --bottleneck 128 --prototypes 4096 --threads 2 --steps 10 --warmup 2
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dinov2_losses import sinkhorn_knopp_teacher, dino_loss, ibot_forward_masked  # noqa: E402


class Backbone(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=a.img,
                                     embed_dim=a.embed_dim, depth=a.depth, num_heads=a.heads)
        self.mask_token = nn.Parameter(torch.zeros(1, a.embed_dim))

    def forward(self, x, masks=None):
        m = self.vit
        x = m.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = m._pos_embed(x)
        x = m.blocks(x)
        x = m.norm(x)
        return x[:, 0], x[:, 1:]


class DinoHead(nn.Module):
    def __init__(self, in_dim, a):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, a.hidden), nn.GELU(), nn.Linear(a.hidden, a.hidden),
                                 nn.GELU(), nn.Linear(a.hidden, a.bottleneck))
        self.last_layer = nn.utils.weight_norm(nn.Linear(a.bottleneck, a.prototypes, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


class Net(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.backbone = Backbone(a)
        self.dino_head = DinoHead(a.embed_dim, a)


def param_groups(net):
    groups = []
    for name, p in net.named_parameters():
        wd = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
        lr = 0.2 if "patch_embed" in name else 1.0
        groups.append({"params": [p], "lr_mult": lr, "wd_mult": wd, "last": "last_layer" in name})
    return groups


def main():
    ap = argparse.ArgumentParser()
    for k, v in dict(embed_dim=192, depth=4, heads=3, img=112, batch=16, hidden=512, bottleneck=128,
                     prototypes=4096, threads=2, steps=10, warmup=2).items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # DINOv2's weight_norm, as DINOv2
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    student = Net(a)
    teacher = Net(a)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(student), betas=(0.9, 0.999))
    s_params = list(student.parameters())
    t_params = list(teacher.parameters())

    b = a.batch
    n = (a.img // 14) ** 2
    crops = torch.randn(2 * b, 3, a.img, a.img)
    masks = torch.zeros(2 * b, n, dtype=torch.bool)
    masks[: b, : int(0.3 * n)] = True  # half the images, 30% of their patches
    mask_idx = masks.flatten().nonzero().flatten()
    n_masked = int(mask_idx.numel())
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    lr, wd, mom, temp = 1e-4, 0.04, 0.994, 0.04

    def step():
        with torch.no_grad():
            t_cls, t_patch = teacher.backbone(crops)
            t_cls = torch.cat((t_cls[b:], t_cls[:b]))
            h = teacher.dino_head(torch.cat((t_cls, t_patch.flatten(0, 1)[mask_idx])))
            t_c = sinkhorn_knopp_teacher(h[: 2 * b], temp, n_samples=2 * b)
            t_p = sinkhorn_knopp_teacher(h[2 * b:], temp, n_samples=n_masked)
        s_cls, s_patch = student.backbone(crops, masks)
        h = student.dino_head(torch.cat((s_cls, s_patch.flatten(0, 1)[mask_idx])))
        loss = dino_loss([h[: 2 * b]], [t_c], 0.1) + ibot_forward_masked(
            h[2 * b:], t_p, masks, 0.1, masks_weight=weights)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.backbone.parameters(), 3.0)
        torch.nn.utils.clip_grad_norm_(student.dino_head.parameters(), 3.0)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
            g["weight_decay"] = wd * g["wd_mult"]
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(t_params, mom)
            torch._foreach_add_(t_params, s_params, alpha=1 - mom)
        return float(loss.detach())

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    dt = (time.perf_counter() - t0) / a.steps
    assert math.isfinite(loss)
    print(json.dumps({"ms_per_step": dt * 1000, "steps": a.steps, "threads": a.threads,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
