"""The benchmark suite: RedDino Edge side by side with the Python stack, in one run.

  ./scripts/bench.sh [--smoke] [--only infer,cells,pipeline,cpu,trainer] [--out DIR]
                     [--real-fields CHULA_DIR]

(scripts/bench.sh prepares the venv and calls this file.) Every measurement runs in its own
process pinned with `taskset` to the same cores, with the same thread count given to every
contender's own thread pool. Writes DIR/results.json, DIR/results.md and DIR/*.png; with the
default DIR (docs/benchmarks) the tables also replace the generated part of
docs/benchmarks.md. --smoke runs everything once on tiny inputs (CI) and writes to
target/bench-smoke.

New inference backends: add an entry to INFER_BACKENDS (a function that returns the command
printing {"images_per_s": ...} for one configuration).
"""
import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench")
PY = sys.executable
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Running one measurement


def pinned(cmd, threads):
    """The command pinned to the first `threads` cores, with every known thread-pool variable
    set to `threads`."""
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[v] = str(threads)
    ncpu = os.cpu_count() or 1
    if threads > ncpu:
        raise SystemExit(f"{threads} threads asked for on a machine with {ncpu} cores")
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", f"0-{threads - 1}"] + cmd
    return cmd, env


def run_json(cmd, threads, extra_env=None):
    """Runs a worker pinned to `threads` cores; returns its JSON line and its peak RSS (MiB)."""
    cmd, env = pinned(cmd, threads)
    env.update(extra_env or {})
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"benchmark step failed ({p.returncode}): {' '.join(cmd)}\n"
                             f"{err.read().decode(errors='replace')[-4000:]}")
    lines = [l for l in out.decode().splitlines() if l.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON from {' '.join(cmd)}:\n{out.decode()[-2000:]}")
    return json.loads(lines[-1]), usage.ru_maxrss / 1024.0


def cargo_executable(profile, args, kind, name):
    """Builds with cargo and returns the path of the `kind` target `name` (an example, a
    bench) built by `args`. The suite builds with `--workspace`: features then resolve as for
    `cargo test --workspace`, so the smoke run reuses the test build instead of rebuilding every
    dependency."""
    cmd = ["cargo", "build", "--locked", "--profile", profile, "--message-format=json-render-diagnostics"] + args
    log("building: " + " ".join(cmd[1:]))
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, check=False)
    if p.returncode != 0:
        raise SystemExit(f"cargo build failed: {' '.join(cmd)}")
    exe = None
    for line in p.stdout.decode().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        t = m.get("target", {})
        if m.get("reason") == "compiler-artifact" and m.get("executable") and \
                t.get("name") == name and kind in t.get("kind", []):
            exe = m["executable"]
    if not exe:
        raise SystemExit(f"cargo built no executable for {args}")
    return exe


# ---------------------------------------------------------------------------------------------
# Machine


def machine():
    info = {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        cpuinfo = ""
    m = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    info["cpu"] = m.group(1).strip() if m else platform.processor()
    mhz = [float(x) for x in re.findall(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo)]
    info["mhz"] = max(mhz) if mhz else None
    flags = set((re.search(r"flags\s*:\s*(.*)", cpuinfo) or re.match("", "")).group(0).split())
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 4
    info["simd"] = {16: "AVX-512 + FMA", 8: "AVX2 + FMA", 4: "SSE"}[lanes]
    info["f32_lanes"] = lanes
    # Peak f32 FLOP/s per core: clock x 2 FMA pipes x lanes x 2 FLOP per FMA (two 256-bit FMA
    # pipes per core on AMD Zen 2-4 and Intel server cores since Skylake).
    info["peak_gflops_per_core"] = (info["mhz"] or 0) / 1e3 * 2 * lanes * 2
    info["derivation"] = (f"{(info['mhz'] or 0) / 1e3:.2f} GHz (/proc/cpuinfo) x 2 FMA pipes x "
                          f"{lanes} f32 lanes ({info['simd']}) x 2 FLOP per FMA = "
                          f"{info['peak_gflops_per_core']:.1f} GFLOP/s per core")
    return info


# ---------------------------------------------------------------------------------------------
# Inference


def infer_tract(ctx, model_dir, preset, size, batch, threads):
    return [ctx["worker"], "infer", "--onnx", os.path.join(model_dir, "model.onnx"), "--size", str(size),
            "--batch", str(batch), "--threads", str(threads)] + ctx["timing"]


def infer_edge_ort(ctx, model_dir, preset, size, batch, threads):
    """The edge's own ONNX Runtime backend (CPU provider), on the wheel's libonnxruntime: the
    Backend call the service makes per batch, input copy included."""
    return infer_tract(ctx, model_dir, preset, size, batch, threads) + [
        "--backend", "onnxruntime", "--onnxruntime-library", ctx["ort_lib"]]


def ort_library():
    """libonnxruntime of the venv's onnxruntime wheel."""
    import glob
    import onnxruntime
    libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
    if not libs:
        raise SystemExit("the onnxruntime wheel has no libonnxruntime.so")
    return libs[0]


def infer_python(backend):
    def cmd(ctx, model_dir, preset, size, batch, threads):
        return [PY, os.path.join(HERE, "py_infer.py"), "--backend", backend, "--model-dir", model_dir,
                "--preset", preset, "--size", str(size), "--batch", str(batch),
                "--threads", str(threads)] + ctx["timing"]
    return cmd


# name -> command builder; "onnxruntime" is the reference of the ratios.
INFER_BACKENDS = {
    "tract": infer_tract,
    "onnxruntime": infer_python("ort"),
    "edge-onnxruntime": infer_edge_ort,
    "pytorch": infer_python("torch"),
}


def bench_infer(ctx, plan):
    rows = []
    for preset in plan["presets"]:
        for size in plan["sizes"]:
            model_dir = os.path.join(ctx["work"], f"model-{preset}-{size}")
            meta, _ = run_json([ctx["worker"], "model", "--preset", preset, "--size", str(size),
                                "--out", model_dir], 1)
            for threads in plan["threads"]:
                for batch in plan["batches"]:
                    row = {"preset": preset, "size": size, "batch": batch, "threads": threads,
                           "macs_per_image": meta["macs_per_image"], "backends": {}}
                    for name, build in INFER_BACKENDS.items():
                        r, rss = run_json(build(ctx, model_dir, preset, size, batch, threads), threads)
                        r["peak_rss_mib"] = rss
                        row["backends"][name] = r
                    ref = row["backends"]["onnxruntime"]["images_per_s"]
                    for r in row["backends"].values():
                        r["ratio_to_ort"] = r["images_per_s"] / ref
                        r["gflops"] = 2 * meta["macs_per_image"] * r["images_per_s"] / 1e9
                        peak = ctx["machine"]["peak_gflops_per_core"] * threads
                        r["pct_peak"] = 100 * r["gflops"] / peak if peak else None
                    log(f"infer {preset} {size} b{batch} t{threads}: " + ", ".join(
                        f"{n} {r['images_per_s']:.1f} img/s" for n, r in row["backends"].items()))
                    rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Cell finding


def match(found, truth, within=0.5):
    """Greedy nearest matching, as the edge's `cells::match_centres`: a detection matches a true
    cell when its centre lies within `within` times the cell's radius (half, for true
    centres); one match per cell."""
    pairs = []
    for i, (x, y) in enumerate(found):
        for j, t in enumerate(truth):
            (cx, cy), r = t["center"], t["radius"]
            d = ((x - cx) ** 2 + (y - cy) ** 2) ** 0.5
            if d <= within * r:
                pairs.append((d, i, j))
    pairs.sort()
    used_d, used_t, tp = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            tp += 1
    return tp


def make_fields(ctx, name, source, w, h, count, seed, density=None):
    d = os.path.join(ctx["work"], name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    cmd = [ctx["worker"], "fields", "--out", d, "--source", source, "--width", str(w), "--height", str(h),
           "--count", str(count), "--seed", str(seed)]
    if density is not None:
        cmd += ["--density", str(density)]
    meta, _ = run_json(cmd, 1)
    return d, meta


def truth_of(d, field):
    return json.load(open(os.path.join(d, field.replace(".png", ".json"))))["cells"]


def bench_cells(ctx, plan):
    rows = []
    for source, density in plan["sources"]:
        w, h = plan["size"]
        d, meta = make_fields(ctx, f"cells-{source}", source, w, h, plan["fields"], 3000, density)
        for threads in plan["threads"]:
            for name, cmd in (
                ("reddino-edge", [ctx["worker"], "cells", "--fields", d, "--reps", str(plan["reps"]),
                                  "--threads", str(threads)]),
                ("opencv", [PY, os.path.join(HERE, "cv_cells.py"), "--fields", d, "--threads", str(threads),
                            "--reps", str(plan["reps"])]),
            ):
                r, _ = run_json(cmd, threads)
                tp = det = tru = 0
                ms = []
                for f in r["fields"]:
                    truth = truth_of(d, f["field"])
                    tp += match(f["centres"], truth)
                    det += len(f["centres"])
                    tru += len(truth)
                    ms.append(f["ms"])
                rows.append({"source": source, "width": w, "height": h, "fields": len(ms), "cells": tru,
                             "contender": name, "threads": threads, "ms_per_field": sum(ms) / len(ms),
                             "recall": tp / max(tru, 1), "precision": tp / max(det, 1),
                             "version": r.get("version", "")})
                log(f"cells {source} t{threads} {name}: {rows[-1]['ms_per_field']:.1f} ms/field, "
                    f"recall {rows[-1]['recall']:.4f}, precision {rows[-1]['precision']:.4f}")
    if plan.get("real"):
        rows += bench_cells_real(ctx, plan)
    return rows


# The real fields in the tree (four Chula RBC-12 fields with their point labels).
REAL_SAMPLE = os.path.join(ROOT, "tests", "data", "chula-rbc-12")
# Fields with at least this many labels are densely labelled (finder-quality's `dense`).
DENSE_LABELS = 60
# A Chula RBC-12 cell's radius in pixels (1000x, 640x480: the normal cells' median box is 42 px),
# and the scale that makes it a 7.5 um cell (scripts/chula-model.sh's).
CHULA_RADIUS = 21.0
CHULA_UM_PER_PX = 0.18


def fnv_fold(name, folds):
    """The edge's `labelled::fold_of`: the fold of a field by the FNV-1a hash of its name."""
    h = 0xcbf29ce484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 32)) % folds


def real_set(ctx, folder):
    """The development fields of a Chula-format folder (images/N.jpg, labels/N.txt; the edge's
    split by name: its held-out fields are left out), linked into one work folder: (folder,
    {field: ((width, height), [(x, y)])})."""
    from PIL import Image

    d = os.path.join(ctx["work"], "cells-real")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    points = {}
    for f in sorted(os.listdir(os.path.join(folder, "images"))):
        stem, ext = os.path.splitext(f)
        lab = os.path.join(folder, "labels", stem + ".txt")
        if ext.lower() not in (".jpg", ".png") or not os.path.isfile(lab) or fnv_fold(stem, 10) in (0, 1):
            continue
        os.symlink(os.path.abspath(os.path.join(folder, "images", f)), os.path.join(d, f))
        with Image.open(os.path.join(d, f)) as im:
            size = im.size
        points[f] = (size, [(float(t[0]), float(t[1])) for t in
                            (line.split() for line in open(lab)) if len(t) >= 2])
    if not points:
        raise SystemExit(f"{folder}: no labelled development fields (images/N.jpg with labels/N.txt)")
    return d, points


def bench_cells_real(ctx, plan):
    """The finder's real-smear profile (also at the fields' scale, as a device that knows it
    runs it) and OpenCV's pipeline on real fields, scored against the point labels: a
    detection finds a labelled cell when its centre lies within a cell's radius of the label
    (a hand-placed point marks the cell, not its centroid), one match per label, nearest
    first; labels and detections within a radius of the frame's edge are left out, as both
    contenders drop the cells the edge cuts. Precision is taken on the densely labelled fields
    alone (many fields label a few of their cells): there a detection that found no label
    counts against it, a cell the field leaves unlabelled against both contenders alike."""
    folder = ctx.get("real_fields") or REAL_SAMPLE
    name = "Chula RBC-12 (real)" if ctx.get("real_fields") else "Chula RBC-12 sample (real)"
    d, points = real_set(ctx, folder)
    rows = []
    r = CHULA_RADIUS
    for threads in plan["threads"]:
        edge = [ctx["worker"], "cells", "--fields", d, "--reps", str(plan["reps"]), "--threads", str(threads),
                "--profile", "real-smear"]
        for contender, cmd in (
            ("reddino-edge", edge),
            ("reddino-edge at the device's scale", edge + ["--um-per-px", str(CHULA_UM_PER_PX)]),
            ("opencv", [PY, os.path.join(HERE, "cv_cells.py"), "--fields", d, "--threads", str(threads),
                        "--reps", str(plan["reps"])]),
        ):
            out, _ = run_json(cmd, threads)
            tp = tru = dense_tp = dense_det = 0
            ms = []
            sizes = set()
            for f in out["fields"]:
                (w, h), labels = points[f["field"]]
                sizes.add(f"{w}x{h}")
                inside = lambda x, y: r <= x < w - r and r <= y < h - r
                truth = [{"center": p, "radius": r} for p in labels if inside(*p)]
                found = [c for c in f["centres"] if inside(*c)]
                hits = match(found, truth, within=1.0)
                tp += hits
                tru += len(truth)
                if len(labels) >= DENSE_LABELS:
                    dense_tp += hits
                    dense_det += len(found)
                ms.append(f["ms"])
            w, h = (int(v) for v in sorted(sizes)[0].split("x"))
            rows.append({"source": name, "real": True, "width": w, "height": h,
                         "fields": len(ms), "cells": tru, "contender": contender, "threads": threads,
                         "ms_per_field": sum(ms) / len(ms), "recall": tp / max(tru, 1),
                         "precision": dense_tp / max(dense_det, 1), "version": out.get("version", "")})
            log(f"cells {name} t{threads} {contender}: {rows[-1]['ms_per_field']:.1f} ms/field, "
                f"recall {rows[-1]['recall']:.4f}, precision {rows[-1]['precision']:.4f}")
    return rows


# ---------------------------------------------------------------------------------------------
# Whole pipeline


def pct(v, q):
    """The q-quantile by nearest rank (as the edge's `service::percentile`)."""
    s = sorted(v)
    return s[min(len(s), max(1, math.ceil(q * len(s)))) - 1] if s else None


def summarise_pipeline(r, rss):
    f = r["frames"]
    lat = [x["latency_ms"] for x in f]
    total = sum(lat)
    model = sum(x["model_ms"] for x in f)
    cells = sum(x["cells"] for x in f)
    return {
        "frames": len(f), "cells": cells, "cells_per_frame": cells / len(f),
        "frames_per_s": len(f) / (total / 1e3), "cells_per_s": cells / (total / 1e3),
        "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
        "stage_ms": {k: sum(x[k] for x in f) / len(f)
                     for k in ("decode_ms", "find_ms", "crop_preprocess_ms", "classify_ms", "model_ms")},
        "outside_model_pct": 100 * (1 - model / total),
        "peak_rss_mib": rss, "model": r["model"], "input_size": r["input_size"],
        "batch": r["batch"], "threads": r["threads"], "per_frame": f,
    }


def bench_pipeline(ctx, plan):
    out = {"main": None, "by_cells": [], "by_size": []}
    t = plan["threads"]
    base = [ctx["worker"], "pipeline", "--batch", str(plan["batch"]), "--threads", str(t), "--fields"]
    w, h = plan["main_size"]
    d, _ = make_fields(ctx, "pipe-main", plan["source"], w, h, plan["frames"], 5000, plan["main_density"])
    out["main"] = summarise_pipeline(*run_json(base + [d], t))
    log(f"pipeline {w}x{h}: {out['main']['frames_per_s']:.2f} frames/s, {out['main']['cells_per_s']:.0f} cells/s")
    for dens in plan["densities"]:
        d, _ = make_fields(ctx, f"pipe-d{dens}", plan["source"], w, h, plan["sweep_frames"], 6000, dens)
        s = summarise_pipeline(*run_json(base + [d], t))
        s["density"] = dens
        out["by_cells"].append(s)
        log(f"pipeline density {dens}: {s['cells_per_frame']:.0f} cells/frame, p50 {s['p50_ms']:.0f} ms")
    for (sw, sh) in plan["sizes"]:
        d, _ = make_fields(ctx, f"pipe-{sw}x{sh}", plan["source"], sw, sh, plan["sweep_frames"], 7000,
                           plan["main_density"])
        s = summarise_pipeline(*run_json(base + [d], t))
        s["size"] = [sw, sh]
        out["by_size"].append(s)
        log(f"pipeline {sw}x{sh}: {s['cells_per_frame']:.0f} cells/frame, p50 {s['p50_ms']:.0f} ms")
    return out


# ---------------------------------------------------------------------------------------------
# CPU stages of a camera frame (null model)


REAL_FIELDS = os.path.join(REAL_SAMPLE, "images")


def bench_cpu(ctx, plan):
    out = {"frames": [], "service": []}
    runs = [(f"{w}x{h}", "demo", lambda w=w, h=h: make_fields(ctx, f"cpu-{w}x{h}", plan["source"], w, h,
                                                             plan["fields"], 8000, plan["density"])[0])
            for (w, h) in plan["sizes"]]
    if plan.get("real") and os.path.isdir(REAL_FIELDS):
        runs.append(("Chula RBC-12 sample (640x480 JPEG)", "chula", lambda: REAL_FIELDS))
    for name, shipped, fields in runs:
        d = fields()
        for t in plan["threads"]:
            r, _ = run_json([ctx["worker"], "frame", "--fields", d, "--threads", str(t), "--reps",
                             str(plan["reps"]), "--shipped", shipped], t)
            f = r["fields"]
            row = {"fields": name, "model": r["model"], "threads": t, "frames": len(f),
                   "width": f[0]["width"], "height": f[0]["height"],
                   "cells_per_frame": sum(x["cells"] for x in f) / len(f)}
            for k in ("decode_ms", "find_ms", "cut_ms", "total_ms", "yuyv_ms"):
                row[k] = sum(x[k] for x in f) / len(f)
            out["frames"].append(row)
            log(f"cpu {name} t{t}: {row['cells_per_frame']:.0f} cells, decode {row['decode_ms']:.1f} + find "
                f"{row['find_ms']:.1f} + cut {row['cut_ms']:.1f} = {row['total_ms']:.1f} ms")
    sv = plan["service"]
    w, h = sv["size"]
    d, _ = make_fields(ctx, f"cpu-{w}x{h}", plan["source"], w, h, plan["fields"], 8000, plan["density"])
    # Side by side: the pipeline as it was (each frame decoded as it arrives, one frame at a
    # time) and as it is (frames decoded when taken, several side by side).
    variants = (("before", ["--decode-at-capture", "--frame-workers", "1"]), ("now", []))
    for t in sv["threads"]:
        for fps in sv["fps"]:
            for variant, args in variants:
                r, _ = run_json([ctx["worker"], "service", "--fields", d, "--threads", str(t), "--fps",
                                 str(fps), "--frames", str(sv["frames"])] + args, t)
                r["variant"] = variant
                out["service"].append(r)
                log(f"service {w}x{h} t{t} at {fps} fps ({variant}): {r['processed']} analysed, "
                    f"{r['dropped']} dropped of {r['captured']}")
    return out


# ---------------------------------------------------------------------------------------------
# Trainer


def bench_trainer(ctx, plan):
    rows = []
    for t in plan["threads"]:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            env = {"REDDINO_BENCH_THREADS": str(t), "REDDINO_BENCH_STEPS": str(plan["steps"]),
                   "REDDINO_BENCH_JSON": f.name, "REDDINO_PYTHON": PY}
            if ctx["smoke"]:
                env["REDDINO_BENCH_SMOKE"] = "1"
            cmd, penv = pinned([ctx["trainer_step"]], t)
            penv.update(env)
            subprocess.run(cmd, env=penv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            r = json.load(open(f.name))
        rows.extend(r)
        log(f"trainer t{t}: " + ", ".join(f"tch {x['tch_ms']:.1f} ms, PyTorch {x['pytorch_ms']:.1f} ms" for x in r))
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def report(res, out_dir):
    m = res["machine"]
    L = []
    runs = {}
    for name, r in res.get("runs", {}).items():
        runs.setdefault((r["command"], r["date"] + (f", {r['cpu']}" if r.get("cpu") else "")), []).append(name)
    L.append("Generated by " + "; ".join(
        f"`{c}` on {d} ({', '.join(n)})" for (c, d), n in runs.items()) + ".")
    L.append("")
    L.append(f"Machine of the latest run (each section's ratios come from one run on one machine): {m['cpu']}, {m['cores']} cores at {fmt(m['mhz'], 0)} MHz, {m['simd']}, "
             f"Linux {m['kernel']}, Python {m['python']}. Contenders: {', '.join(res['versions'])}. "
             f"Every measurement is its own process pinned (`taskset`) to the first T cores with T "
             f"threads given to its thread pool (tract's: chunks of the batch side by side, onnxruntime "
             f"intra-op threads with one inter-op thread, torch.set_num_threads, "
             f"cv2.setNumThreads).")
    L.append("")
    L.append(f"Peak f32 FLOP/s: {m['derivation']}.")
    L.append("")
    if res.get("infer"):
        L.append("### Inference: tract vs onnxruntime (Python and the edge's) vs PyTorch eager (images/s)")
        L.append("")
        L.append("Same ONNX file for tract and onnxruntime, same weights in timm's DINOv2 ViT for "
                 "PyTorch; each contender first checks its embeddings of two probe images against "
                 "tract's (max difference in the JSON). Ratios are to onnxruntime; FLOP/s = 2 x "
                 "MACs per image x images/s, as a share of the T cores' peak.")
        L.append("")
        L.append("The edge's ONNX Runtime backend (`model.backend = \"onnxruntime\"`, CPU provider, "
                 "the wheel's libonnxruntime loaded at run time) runs through the same Backend call "
                 "the service makes per batch; its ratio to Python onnxruntime is the cost of that "
                 "path.")
        L.append("")
        L.append("| model | input | batch | threads | tract | onnxruntime | edge ORT | PyTorch | tract / ORT | edge ORT / ORT | PyTorch / ORT | tract GFLOP/s | tract % of peak | ORT % of peak |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["infer"]:
            b = r["backends"]
            L.append(f"| {r['preset']} | {r['size']} | {r['batch']} | {r['threads']} | "
                     f"{fmt(b['tract']['images_per_s'])} | {fmt(b['onnxruntime']['images_per_s'])} | "
                     f"{fmt(b['edge-onnxruntime']['images_per_s'])} | "
                     f"{fmt(b['pytorch']['images_per_s'])} | {fmt(b['tract']['ratio_to_ort'], 2)} | "
                     f"{fmt(b['edge-onnxruntime']['ratio_to_ort'], 2)} | "
                     f"{fmt(b['pytorch']['ratio_to_ort'], 2)} | {fmt(b['tract']['gflops'])} | "
                     f"{fmt(b['tract']['pct_peak'])} | {fmt(b['onnxruntime']['pct_peak'])} |")
        L.append("")
        L.append("![inference](inference.png)")
        L.append("")
    if res.get("cells"):
        L.append("### Cell finding: reddino-edge vs OpenCV")
        L.append("")
        L.append("Same fields (decoding not timed), best of N runs per field; a detection matches "
                 "a true cell when its centre lies within half the cell's radius (one match per "
                 "cell), scored by the suite for both. The edge's finder runs on a rayon pool of T "
                 "threads (the same detections on any number). Synthetic fields: the default "
                 "profile, against the true cells. Real fields (Chula RBC-12 development fields, "
                 "640x480 JPEG): the real-smear profile, against the point labels (within a cell's radius, "
                 f"taken as {CHULA_RADIUS:.0f} px: a hand-placed point marks the cell, not its "
                 "centroid), labels and detections within a radius of the "
                 "frame's edge left out (both contenders drop cut cells); precision on the fields of at "
                 f"least {DENSE_LABELS} labels, where a detection of a cell the field leaves unlabelled "
                 "counts against it for both. At the device's scale: the finder given the fields' scale "
                 f"({CHULA_UM_PER_PX} um per pixel, a device's `analysis.um_per_px`) instead of a first "
                 "look at each field.")
        L.append("")
        L.append("| source | size | fields | cells | contender | threads | ms per field | recall | precision |")
        L.append("|---|---|---:|---:|---|---:|---:|---:|---:|")
        for r in res["cells"]:
            L.append(f"| {r['source']} | {r['width']}x{r['height']} | {r['fields']} | {r['cells']} | "
                     f"{r['contender']} | {r['threads']} | {fmt(r['ms_per_field'])} | "
                     f"{fmt(r['recall'], 4)} | {fmt(r['precision'], 4)} |")
        L.append("")
        L.append("![cell finding](cells.png)")
        L.append("")
    p = res.get("pipeline")
    if p:
        mn = p["main"]
        L.append("### Whole pipeline (reddino-edge per-frame path, replayed fields)")
        L.append("")
        L.append(f"Model: {mn['model']} (the shipped demo model, input {mn['input_size']}), batch "
                 f"{mn['batch']}, {mn['threads']} threads. Per frame: decode the PNG, find cells, "
                 f"crop, preprocess, model, classify; frames one after the other.")
        L.append("")
        L.append("| fields | frames | cells/frame | frames/s | cells/s | p50 ms | p99 ms | peak RSS MiB | outside model % |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = [("main", mn)] + [(f"density {s['density']}", s) for s in p["by_cells"]] + \
               [(f"{s['size'][0]}x{s['size'][1]}", s) for s in p["by_size"]]
        for name, s in rows:
            L.append(f"| {name} | {s['frames']} | {fmt(s['cells_per_frame'], 0)} | {fmt(s['frames_per_s'], 2)} | "
                     f"{fmt(s['cells_per_s'], 0)} | {fmt(s['p50_ms'], 0)} | {fmt(s['p99_ms'], 0)} | "
                     f"{fmt(s['peak_rss_mib'], 0)} | {fmt(s['outside_model_pct'])} |")
        L.append("")
        st = mn["stage_ms"]
        L.append("Time per frame by stage (main fields): " + ", ".join(
            f"{k.replace('_ms', '').replace('_', ' + ')} {v:.1f} ms" for k, v in st.items()) + ".")
        L.append("")
        L.append("![latency vs cells](pipeline_cells.png) ![latency vs frame size](pipeline_size.png)")
        L.append("")
    c = res.get("cpu")
    if c:
        L.append("### CPU stages of a camera frame (null model)")
        L.append("")
        L.append("What the CPU spends per frame when the model runs elsewhere (the GPU): the frame as a "
                 "camera's MJPG (synthetic fields encoded at JPEG quality 90; the real fields are the "
                 "data set's own JPEGs) decoded, its cells found, cut, resized and normalised into the "
                 "model's input batch, with the finder and the cuts on T threads; best of N per stage and "
                 "field, averaged over the fields. YUYV: converting the same frame from a YUYV camera "
                 "instead of decoding MJPG.")
        L.append("")
        L.append("| fields | model (finder, crops) | threads | cells/frame | MJPG decode ms | find ms | cut + preprocess ms | total ms | YUYV ms |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in c["frames"]:
            L.append(f"| {r['fields']} | {r['model']} | {r['threads']} | {fmt(r['cells_per_frame'], 0)} | "
                     f"{fmt(r['decode_ms'])} | {fmt(r['find_ms'])} | {fmt(r['cut_ms'])} | "
                     f"**{fmt(r['total_ms'])}** | {fmt(r['yuyv_ms'])} |")
        L.append("")
        if c["service"]:
            L.append("The service's pipeline (capture thread, cells stage on T threads, inference thread "
                     "with the null model) fed by an MJPG camera at a fixed rate; frames the cells stage "
                     "cannot keep up with are dropped (oldest first) and counted. Before: each frame "
                     "decoded in the capture thread as it arrives, one frame at a time in the cells "
                     "stage. Now: frames wait undecoded, and the cells stage decodes, finds and cuts "
                     "two or more side by side (the same runs, one after the other). ms per frame: "
                     "the wall time per analysed frame, while frames are dropped the CPU stages' "
                     "throughput:")
            L.append("")
            L.append("| frame | threads | camera fps | pipeline | frames | analysed | dropped | "
                     "analysed per s | ms per frame |")
            L.append("|---|---:|---:|---|---:|---:|---:|---:|---:|")
            for r in c["service"]:
                per = 1000.0 / r["analysed_per_s"] if r["analysed_per_s"] else None
                L.append(f"| {r['width']}x{r['height']} | {r['threads']} | {fmt(r['fps'], 0)} | "
                         f"{r.get('variant', 'now')} | {r['captured']} | {r['processed']} | {r['dropped']} | "
                         f"{fmt(r['analysed_per_s'])} | {fmt(per)} |")
            L.append("")
    if res.get("trainer"):
        L.append("### Trainer step: tch vs PyTorch (tiny preset, CPU)")
        L.append("")
        L.append("`cargo bench -p reddino-trainer --bench step` against tests/reference/pytorch_step.py (same "
                 "torch build, model, losses and optimiser; see \"Trainer step\" below): each side timed in "
                 "alternating rounds, the fastest round of each counts.")
        L.append("")
        L.append("| threads | rounds x steps | tch ms/step | PyTorch ms/step | ratio |")
        L.append("|---:|---:|---:|---:|---:|")
        for r in res["trainer"]:
            L.append(f"| {r['threads']} | {r.get('rounds', 1)} x {r['steps']} | {fmt(r['tch_ms'])} | "
                     f"{fmt(r['pytorch_ms'])} | {fmt(r['tch_ms'] / r['pytorch_ms'], 3)} |")
        L.append("")
    L.append("### Targets")
    L.append("")
    L.append("| target | figure | met |")
    L.append("|---|---|---|")
    for t in res["targets"]:
        L.append(f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else 'no'} |")
    L.append("")
    text = "\n".join(L)
    open(os.path.join(out_dir, "results.md"), "w").write(text + "\n")
    return text


def targets(res):
    out = []
    if res.get("infer"):
        ratios = [r["backends"]["tract"]["ratio_to_ort"] for r in res["infer"]]
        worst = min(ratios)
        out.append({"target": "tract >= 0.8x onnxruntime images/s at equal threads (every row)",
                    "figure": f"tract/ORT {min(ratios):.2f} to {max(ratios):.2f}, "
                              f"{sum(x >= 0.8 for x in ratios)} of {len(ratios)} rows >= 0.8",
                    "met": worst >= 0.8})
        pk = max(r["backends"]["tract"]["pct_peak"] or 0 for r in res["infer"])
        out.append({"target": "model >= 40% of the CPU's peak FLOP/s (best tract row)",
                    "figure": f"{pk:.1f}% of peak", "met": pk >= 40})
    if res.get("cells"):
        for real in (False, True):
            rows = [r for r in res["cells"] if bool(r.get("real")) == real]
            for t in sorted({r["threads"] for r in rows}):
                ours = [r for r in rows if r["contender"] == "reddino-edge" and r["threads"] == t]
                cv = [r for r in rows if r["contender"] == "opencv" and r["threads"] == t]
                speed = sum(r["ms_per_field"] for r in cv) / sum(r["ms_per_field"] for r in ours)
                avg = lambda rs, k: sum(r[k] * r["cells"] for r in rs) / sum(r["cells"] for r in rs)
                rec_o, rec_c = avg(ours, "recall"), avg(cv, "recall")
                pre_o, pre_c = avg(ours, "precision"), avg(cv, "precision")
                where = "real fields" if real else "synthetic fields"
                # The bar: twice OpenCV's speed on one thread, faster than it on more.
                bar, bar_text = (2.0, ">= 2x faster than") if t == 1 else (1.0, "faster than")
                out.append({"target": f"cell finding {bar_text} OpenCV at >= its recall and precision, "
                                      f"{where} ({t} thread{'s' if t > 1 else ''})",
                            "figure": f"{speed:.2f}x OpenCV's speed; recall {rec_o:.4f} vs {rec_c:.4f}, "
                                      f"precision {pre_o:.4f} vs {pre_c:.4f}",
                            "met": (speed >= bar if t == 1 else speed > bar)
                                   and rec_o >= rec_c and pre_o >= pre_c})
    if res.get("cpu"):
        for t, bar in ((1, 40), (2, 25)):
            r = [x for x in res["cpu"]["frames"] if x["threads"] == t and x["width"] == 1920 and x["height"] == 1080]
            if r:
                ms = r[0]["total_ms"]
                out.append({"target": f"CPU stages of a 1920x1080 MJPG frame (decode, find, cut into the batch) <= {bar} ms on {t} thread{'s' if t > 1 else ''}",
                            "figure": f"{ms:.1f} ms", "met": ms <= bar})
            # The same bar as throughput: the service fed by a camera at least as fast as the bar
            # keeps up (drops nothing) or analyses a frame per `bar` ms of wall time.
            s = [x for x in res["cpu"].get("service", []) if x["threads"] == t and x.get("variant", "now") == "now"
                 and x["width"] == 1920 and x["fps"] * bar >= 1000 and x["analysed_per_s"]]
            if s:
                best = max(s, key=lambda x: x["analysed_per_s"])
                ms = 1000.0 / best["analysed_per_s"]
                out.append({"target": f"the service keeps up with a 1920x1080 MJPG camera at {1000 / bar:.0f} frames/s on {t} thread{'s' if t > 1 else ''} (CPU stages, null model)",
                            "figure": f"{best['analysed_per_s']:.1f} frames/s analysed ({ms:.1f} ms per frame), {best['dropped']} of {best['captured']} dropped, camera at {best['fps']:.0f} fps",
                            "met": best["dropped"] == 0 or ms <= bar})
    if res.get("pipeline"):
        o = res["pipeline"]["main"]["outside_model_pct"]
        out.append({"target": "everything but the model <= 15% of the time per field",
                    "figure": f"{o:.1f}% outside the model", "met": o <= 15})
    if res.get("trainer"):
        r = [x["tch_ms"] / x["pytorch_ms"] for x in res["trainer"]]
        out.append({"target": "trainer step tch / PyTorch <= 1.05",
                    "figure": ", ".join(f"{x:.3f}" for x in r), "met": max(r) <= 1.05})
    return out


def plots(res, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if res.get("infer"):
        threads = sorted({r["threads"] for r in res["infer"]})
        fig, axes = plt.subplots(1, len(threads), figsize=(7 * len(threads), 4.5), squeeze=False)
        for ax, t in zip(axes[0], threads):
            rows = [r for r in res["infer"] if r["threads"] == t]
            names = list(INFER_BACKENDS)
            x = range(len(rows))
            wdt = 0.8 / len(names)
            for k, n in enumerate(names):
                ax.bar([i + k * wdt for i in x], [r["backends"][n]["images_per_s"] for r in rows], wdt, label=n)
            ax.set_xticks([i + 0.4 - wdt / 2 for i in x])
            ax.set_xticklabels([f"{r['preset']}\n{r['size']} b{r['batch']}" for r in rows], fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("images/s (log)")
            ax.set_title(f"ViT inference, {t} thread{'s' if t > 1 else ''}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "inference.png"), dpi=90)
        plt.close(fig)
    if res.get("cells"):
        fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(res["cells"])), 4))
        labels = [f"{r['source']}\n{r['contender']} t{r['threads']}" for r in res["cells"]]
        bars = ax.bar(range(len(labels)), [r["ms_per_field"] for r in res["cells"]],
                      color=["tab:red" if r["contender"].startswith("reddino-edge") else "tab:blue" for r in res["cells"]])
        for b, r in zip(bars, res["cells"]):
            ax.annotate(f"R {r['recall']:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("ms per field")
        ax.set_title("Cell finding (R = recall)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "cells.png"), dpi=90)
        plt.close(fig)
    p = res.get("pipeline")
    if p:
        for key, xname, fname, xf in (
            ("by_cells", "cells in the frame", "pipeline_cells.png", lambda f: f["cells"]),
            ("by_size", "frame size (megapixels)", "pipeline_size.png", lambda f: f["width"] * f["height"] / 1e6),
        ):
            fig, ax = plt.subplots(figsize=(6, 4))
            frames = [f for s in p[key] for f in s["per_frame"]]
            xs = [xf(f) for f in frames]
            ax.scatter(xs, [f["latency_ms"] for f in frames], label="frame latency", s=14)
            ax.scatter(xs, [f["model_ms"] for f in frames], label="model", s=14, marker="x")
            ax.scatter(xs, [f["latency_ms"] - f["model_ms"] for f in frames], label="everything else", s=14, marker="^")
            ax.set_xlabel(xname)
            ax.set_ylabel("ms")
            ax.set_title(f"Frame latency vs {xname.split(' (')[0]}")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, fname), dpi=90)
            plt.close(fig)


# ---------------------------------------------------------------------------------------------


def plans(smoke):
    if smoke:
        return {
            "infer": {"presets": ["tiny"], "sizes": [56], "batches": [1, 2], "threads": [1]},
            "cells": {"sources": [("wright_100x", None)], "size": (480, 360), "fields": 1, "reps": 1, "threads": [1],
                      "real": True},
            "pipeline": {"source": "wright_100x", "main_size": (480, 360), "main_density": None, "frames": 2,
                         "densities": [0.1], "sizes": [(320, 240)], "sweep_frames": 1, "batch": 16, "threads": 1},
            "cpu": {"source": "wright_100x", "sizes": [(480, 360)], "density": None, "fields": 1, "reps": 1,
                    "threads": [1], "real": False,
                    "service": {"size": (480, 360), "fps": [5], "frames": 3, "threads": [1]}},
            "trainer": {"threads": [1], "steps": 1},
        }
    return {
        "infer": {"presets": ["tiny", "small"], "sizes": [224, 112], "batches": [1, 8, 32], "threads": [1, 2]},
        "cells": {"sources": [("wright_100x", 0.23), ("mgg_100x", 0.29)], "size": (1920, 1080), "fields": 4,
                  "reps": 5, "threads": [1, 2], "real": True},
        "pipeline": {"source": "wright_100x", "main_size": (1920, 1080), "main_density": 0.23, "frames": 12,
                     "densities": [0.05, 0.1, 0.2, 0.3, 0.4], "sizes": [(640, 480), (1280, 960), (1920, 1080), (2592, 1944)],
                     "sweep_frames": 3, "batch": 16, "threads": 2},
        "cpu": {"source": "wright_100x", "sizes": [(640, 480), (1280, 960), (1920, 1080), (2592, 1944)],
                "density": 0.23, "fields": 3, "reps": 5, "threads": [1, 2], "real": True,
                "service": {"size": (1920, 1080), "fps": [30, 40, 60], "frames": 150, "threads": [1, 2]}},
        "trainer": {"threads": [1, 2], "steps": 20},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="everything once on tiny inputs (CI)")
    ap.add_argument("--only", default="infer,cells,pipeline,cpu,trainer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="cargo profile (default: release; test with --smoke)")
    ap.add_argument("--real-fields", default=None, metavar="DIR",
                    help="a Chula RBC-12 folder (images/, labels/) whose development fields the cells section "
                         "scores both finders on (default: the four sample fields in tests/data)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the tables, plots and docs from DIR/results.json without measuring")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in only:
        if s not in ("infer", "cells", "pipeline", "cpu", "trainer"):
            raise SystemExit(f"unknown benchmark {s!r} (infer, cells, pipeline, cpu, trainer)")
    out_dir = args.out or os.path.join(ROOT, "target/bench-smoke" if args.smoke else "docs/benchmarks")
    profile = args.profile or ("test" if args.smoke else "release")
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(ROOT, "target", "bench-work")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    if args.report_only:
        res = json.load(open(os.path.join(out_dir, "results.json")))
        res["targets"] = targets(res)
        finish(res, out_dir, args.smoke)
        return

    if args.real_fields and not os.path.isdir(os.path.join(args.real_fields, "images")):
        raise SystemExit(f"--real-fields {args.real_fields}: no images/ folder there")
    ctx = {"smoke": args.smoke, "work": work, "machine": machine(), "real_fields": args.real_fields,
           "timing": ["--min-time", "0", "--min-reps", "1"] if args.smoke else ["--min-time", "3", "--min-reps", "2"]}
    ctx["ort_lib"] = ort_library()
    ctx["worker"] = cargo_executable(profile, ["--workspace", "--example", "bench_worker"],
                                     "example", "bench_worker")
    if "trainer" in only:
        ctx["trainer_step"] = cargo_executable(profile, ["--workspace", "--bench", "step"],
                                               "bench", "step")
    plan = plans(args.smoke)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": ctx["machine"], "profile": profile, "smoke": args.smoke,
           "plan": plan}
    versions = subprocess.run([PY, "-c", "import onnxruntime, torch, timm, cv2; print(f'onnxruntime "
                               "{onnxruntime.__version__}, torch {torch.__version__}, timm {timm.__version__}, "
                               "opencv {cv2.__version__}')"], stdout=subprocess.PIPE, check=True, cwd=ROOT)
    res["versions"] = ["tract (reddino-models)"] + versions.stdout.decode().strip().split(", ")
    for name, fn in (("infer", bench_infer), ("cells", bench_cells), ("pipeline", bench_pipeline),
                     ("cpu", bench_cpu), ("trainer", bench_trainer)):
        if name in only:
            log(f"== {name}")
            res[name] = fn(ctx, plan[name])
    command = "./scripts/bench.sh" + (" --smoke" if args.smoke else "") + \
              (f" --only {args.only}" if args.only != "infer,cells,pipeline,cpu,trainer" else "") + \
              (f" --real-fields {args.real_fields}" if args.real_fields else "")
    res["runs"] = {name: {"command": command, "date": res["date"], "cpu": ctx["machine"]["cpu"]}
                   for name in only}
    previous = os.path.join(out_dir, "results.json")
    if not args.smoke and os.path.exists(previous):
        # A partial run (--only) keeps the other sections of the last run.
        old = json.load(open(previous))
        for name in ("infer", "cells", "pipeline", "cpu", "trainer"):
            if name not in only and old.get(name):
                res[name] = old[name]
                res["runs"][name] = old.get("runs", {}).get(
                    name, {"command": old.get("command", "./scripts/bench.sh"), "date": old.get("date")})
                log(f"{name}: kept from {previous} ({res['runs'][name]['date']})")
    res["command"] = command
    res["targets"] = targets(res)
    res["wall_min"] = (time.time() - started) / 60
    finish(res, out_dir, args.smoke)


def finish(res, out_dir, smoke):
    """Writes results.json, the plots, results.md and (for docs/benchmarks) docs/benchmarks.md."""
    json.dump(res, open(os.path.join(out_dir, "results.json"), "w"), indent=1)
    plots(res, out_dir)
    text = report(res, out_dir)
    doc = os.path.join(ROOT, "docs", "benchmarks.md")
    if os.path.abspath(out_dir) == os.path.join(ROOT, "docs", "benchmarks") and not smoke:
        body = open(doc).read()
        if BEGIN in body and END in body:
            text = text.replace("](", "](benchmarks/")
            body = body[:body.index(BEGIN) + len(BEGIN)] + "\n" + text + "\n" + body[body.index(END):]
            open(doc, "w").write(body)
            log(f"updated {doc}")
    for t in res["targets"]:
        log(f"target: {t['target']}: {t['figure']} -> {'met' if t['met'] else 'NOT met'}")
    log(f"results in {out_dir} ({res.get('wall_min', 0):.1f} min)")


if __name__ == "__main__":
    main()
