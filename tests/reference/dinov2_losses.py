"""Reference values of DINOv2's losses on fixed tensors, for the trainer's unit tests.

The functions below are DINOv2's (facebookresearch/dinov2, dinov2/loss/dino_clstoken_loss.py,
ibot_patch_loss.py, koleo_loss.py and the loss assembly of dinov2/train/ssl_meta_arch.py), with
the distributed reductions removed (world size 1).

Writes OUT_DIR/dinov2_losses.safetensors.
Usage: python dinov2_losses.py OUT_DIR
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_samples, n_iterations=3):
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = n_samples
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp):
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            loss = torch.sum(t * lsm, dim=-1)
            total_loss -= loss.mean()
    return total_loss


def ibot_forward_masked(s, t, student_masks_flat, student_temp, n_masked_patches=None, masks_weight=None):
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = (1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


def koleo(student_output, eps=1e-8):
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, I = torch.max(dots, dim=1)
    distances = nn.PairwiseDistance(2, eps=eps)(student_output, student_output[I])
    return -torch.log(distances + eps).mean()


def main(out):
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(4242)
    B, K, N, D = 6, 32, 16, 12  # 6 images (3 per crop), 32 prototypes, 4x4 patches
    # teacher scores are cosines (normalised bottleneck x unit prototypes): |t| <= ~1
    teacher_temp, student_temp = 0.05, 0.1
    t_cls = 0.4 * torch.randn((B, K), generator=g)
    s_cls = 3 * torch.randn((B, K), generator=g)
    masks = torch.rand((B, N), generator=g) < 0.35
    masks[1] = False  # an image without masked patches still counts in iBOT's denominator
    n_masked = int(masks.sum())
    t_patch = 0.4 * torch.randn((n_masked, K), generator=g)
    s_patch = 3 * torch.randn((n_masked, K), generator=g)
    feats = torch.randn((B, D), generator=g)

    sk_cls = sinkhorn_knopp_teacher(t_cls, teacher_temp, n_samples=B)
    sk_patch = sinkhorn_knopp_teacher(t_patch, teacher_temp, n_samples=n_masked)
    # ssl_meta_arch: dino loss over both global crops, scaled by 2 / n_loss_terms(=2).
    dino = dino_loss([s_cls], [sk_cls], student_temp) * 2 / 2
    # iBOT: loss_scales(2) * ibot_loss_scale(1/2).
    ibot = ibot_forward_masked(s_patch, sk_patch, masks, student_temp) * 2 * 0.5
    center = torch.zeros(1, K)
    centered = F.softmax((t_cls - center) / teacher_temp, dim=-1)
    kol = koleo(feats)

    # DINOv2's interpolate_pos_encoding (vision_transformer.py): patch grid 16 -> 7 (98 px
    # local crops), bicubic, scale factor (7 + 0.1) / 16, no antialias.
    pos = torch.randn((1, 1 + 16 * 16, 8), generator=g)
    patch = pos[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    s = (7 + 0.1) / 16
    patch = F.interpolate(patch, scale_factor=(s, s), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (7, 7)
    pos_7 = torch.cat((pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 49, 8)), dim=1)

    save_file({
        "t_cls": t_cls, "s_cls": s_cls, "masks": masks.to(torch.uint8),
        "t_patch": t_patch, "s_patch": s_patch, "feats": feats,
        "sk_cls": sk_cls, "sk_patch": sk_patch, "centered": centered,
        "dino": dino.reshape(1), "ibot": ibot.reshape(1), "koleo": kol.reshape(1),
        "temps": torch.tensor([teacher_temp, student_temp]),
        "pos": pos, "pos_7": pos_7.contiguous(),
    }, os.path.join(out, "dinov2_losses.safetensors"))
    print(f"DINOv2 loss references written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
