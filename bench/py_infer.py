"""Images/s of the benchmark ViT in a Python contender; prints one JSON object.

  python py_infer.py --backend ort|torch --model-dir DIR --preset P --size S --batch B --threads T

DIR holds what `bench_worker model` wrote: model.onnx (onnxruntime runs it), weights.safetensors
(loaded into timm's DINOv2 ViT for PyTorch eager) and probe.safetensors (two images and tract's
embeddings of them: the contender must agree before it is timed).
"""
import argparse
import json
import os
import time

import numpy as np

# Embed dim, depth, heads of the presets (reddino-models arch.rs).
PRESETS = {"tiny": (192, 4, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def ort_backend(args):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(args.model_dir, "model.onnx"), so,
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    name = "embedding" if "embedding" in outs else outs[0]

    def run(x):
        return sess.run([name], {inp: x})[0]

    return run, f"onnxruntime {ort.__version__}"


def torch_backend(args):
    import torch
    import timm
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    d, depth, heads = PRESETS[args.preset]
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=args.size,
                              embed_dim=d, depth=depth, num_heads=heads)
    sd = load_file(os.path.join(args.model_dir, "weights.safetensors"))
    model.load_state_dict(sd, strict=True)
    model.eval()

    def run(x):
        with torch.inference_mode():
            return model.forward_features(torch.from_numpy(x))[:, 0].numpy()

    return run, f"torch {torch.__version__} eager, timm {timm.__version__}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["ort", "torch"], required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--min-reps", type=int, default=3)
    args = ap.parse_args()

    from safetensors.numpy import load_file as load_np

    t = time.perf_counter()
    run, version = (ort_backend if args.backend == "ort" else torch_backend)(args)
    load_s = time.perf_counter() - t
    probe = load_np(os.path.join(args.model_dir, "probe.safetensors"))
    got = run(np.ascontiguousarray(probe["pixels"], dtype=np.float32))
    diff = float(np.abs(got - probe["embedding"]).max())
    if not diff < 1e-3:
        raise SystemExit(f"{args.backend} disagrees with tract on the probe images: max diff {diff}")

    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(args.batch, 3, args.size, args.size)).astype(np.float32)
    run(x)  # warm-up
    reps, t = 0, time.perf_counter()
    while reps < args.min_reps or time.perf_counter() - t < args.min_time:
        run(x)
        reps += 1
    s = (time.perf_counter() - t) / reps
    print(json.dumps({"images_per_s": args.batch / s, "ms_per_batch": s * 1e3, "reps": reps,
                      "load_s": load_s, "probe_max_diff": diff, "version": version}))


if __name__ == "__main__":
    main()
