#!/usr/bin/env python3
"""Class-balanced logistic regression on raw crop pixels, 5 folds by field: the pixel baseline
of the real-cell model, run on the crops `reddino-edge import --folds 5` writes.

    .venv/bin/python scripts/pixel-baseline.py CROPS DATA [--floors 0,45,55] [--size]

CROPS is the import's output (crops.csv: field, fold, class, box); DATA the data set
(DATA/images/FIELD.jpg). Each crop is re-cut from its field as the edge cuts it (a square of
1.3 times the box's longer side, no smaller than 1.3 x FLOOR pixels, shifted inside the frame),
resized to 28 x 28, standardised, and fed to sklearn's LogisticRegression (C = 0.05,
class_weight='balanced'). --size adds the box's log width, height, area and elongation.
Prints accuracy and balanced accuracy, pooled over the five held-out folds.
"""
import argparse, csv
import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

ap = argparse.ArgumentParser()
ap.add_argument("crops"); ap.add_argument("data")
ap.add_argument("--floors", default="0"); ap.add_argument("--size", action="store_true")
a = ap.parse_args()
rows = list(csv.DictReader(open(f"{a.crops}/crops.csv")))
classes = sorted({r["class"] for r in rows})
y = np.array([classes.index(r["class"]) for r in rows])
fold = np.array([int(r["part"].removeprefix("fold")) for r in rows])
box = np.array([[int(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in rows])
w, h = (box[:, 2] - box[:, 0]).astype(float), (box[:, 3] - box[:, 1]).astype(float)
size = np.stack([np.log(w), np.log(h), np.log(w * h), np.maximum(w, h) / np.minimum(w, h)], 1)
fields = {}

def pixels(floor, S=28, margin=1.3):
    out = []
    for r, b in zip(rows, box):
        im = fields.setdefault(r["field"], None) or Image.open(f"{a.data}/images/{r['field']}.jpg").convert("RGB")
        fields[r["field"]] = im
        side = int(round(max(b[2] - b[0], b[3] - b[1], 1, floor) * margin))
        side = max(1, min(side, im.width, im.height))
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        l = int(min(max(round(cx - side / 2), 0), im.width - side))
        t = int(min(max(round(cy - side / 2), 0), im.height - side))
        out.append(np.asarray(im.crop((l, t, l + side, t + side)).resize((S, S), Image.BILINEAR), np.float32).ravel() / 255)
    return np.stack(out)

def cv(F, name):
    pred = np.zeros_like(y)
    for k in range(5):
        tr, te = fold != k, fold == k
        sc = StandardScaler().fit(F[tr])
        clf = LogisticRegression(max_iter=300, C=0.05, class_weight="balanced")
        clf.fit(sc.transform(F[tr]), y[tr])
        pred[te] = clf.predict(sc.transform(F[te]))
    print(f"{name}: accuracy {accuracy_score(y, pred):.3f}, balanced accuracy {balanced_accuracy_score(y, pred):.3f}", flush=True)

for floor in [float(f) for f in a.floors.split(",")]:
    X = pixels(floor)
    cv(X, f"pixels, floor {floor:g} px")
    if a.size:
        cv(np.concatenate([X, np.repeat(size, 20, 1)], 1), f"pixels + box size, floor {floor:g} px")
