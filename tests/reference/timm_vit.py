"""Reference outputs of timm's DINOv2 ViT for the Rust parity tests.

Writes into OUT_DIR:
  vit_small.safetensors            random timm `vit_small_patch14_dinov2` weights (img_size=224)
  vit_small_224_io.safetensors     `pixels` [2,3,224,224] and timm's `embedding` [2,384]
  vit_small_112_io.safetensors     same at img_size=112, pos_embed resampled by timm
  vit_reg_56.safetensors           random tiny register model (no_embed_class, 2 registers)
  vit_reg_56_io.safetensors        its `pixels` and `embedding`
  resample.safetensors             a [1,16*16,8] grid resampled to 8, 5 and 20 per side

Usage: python timm_vit.py OUT_DIR
"""
import math
import os
import sys

import torch
import timm
from timm.layers import resample_abs_pos_embed
from safetensors.torch import save_file


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random; LayerScale gammas near 1 so that every block matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2 and name not in ("cls_token", "pos_embed", "reg_token"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def state(model: torch.nn.Module) -> dict:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def run(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        return tokens[:, 0].contiguous()  # CLS after the final norm


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gen = torch.Generator().manual_seed(20260101)

    m224 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224)
    randomise(m224, gen)
    save_file(state(m224), os.path.join(out, "vit_small.safetensors"))
    x224 = torch.randn((2, 3, 224, 224), generator=gen)
    save_file({"pixels": x224, "embedding": run(m224, x224)},
              os.path.join(out, "vit_small_224_io.safetensors"))

    m112 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112)
    sd = state(m224)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[8, 8], num_prefix_tokens=1)
    m112.load_state_dict(sd)
    x112 = torch.randn((2, 3, 112, 112), generator=gen)
    save_file({"pixels": x112, "embedding": run(m112, x112)},
              os.path.join(out, "vit_small_112_io.safetensors"))

    reg = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                            embed_dim=128, depth=2, num_heads=2, reg_tokens=2)
    randomise(reg, gen)
    save_file(state(reg), os.path.join(out, "vit_reg_56.safetensors"))
    xr = torch.randn((3, 3, 56, 56), generator=gen)
    save_file({"pixels": xr, "embedding": run(reg, xr)}, os.path.join(out, "vit_reg_56_io.safetensors"))

    grid = torch.randn((1, 16 * 16, 8), generator=gen)
    res = {"grid": grid.contiguous()}
    for n in (8, 5, 20):
        res[f"to_{n}"] = resample_abs_pos_embed(grid, new_size=[n, n], num_prefix_tokens=0).contiguous()
    save_file(res, os.path.join(out, "resample.safetensors"))
    print(f"timm {timm.__version__} / torch {torch.__version__}: references written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
