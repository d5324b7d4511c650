"""The OpenCV contender for cell finding; prints one JSON object.

  python cv_cells.py --fields DIR --threads T [--reps N]

The textbook OpenCV pipeline for the job the edge's finder does (docs/architecture.md): grey
level, Otsu threshold, opening, hole filling (pale centres), distance transform, one marker per
distance peak, watershed to split touching cells, then the same rules as the edge - objects
touching the frame border and debris under 2% of the median area are dropped. Per field: the
best-of-N time of everything after decoding, and the detected centres.
"""
import argparse
import json
import os

import cv2
import numpy as np


def find_cells(img):
    h, w = img.shape[:2]
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    k3 = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k3)
    # Fill holes: flood the background from outside the frame; what it cannot reach is a hole.
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    ff = padded.copy()
    cv2.floodFill(ff, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 255)
    mask = cv2.bitwise_or(mask, cv2.bitwise_not(ff)[1:-1, 1:-1])

    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    fg = dist[mask > 0]
    if fg.size == 0:
        return []
    # Typical cell radius from the upper distances; peaks are local maxima over a window of
    # about half that radius and at least a third of it high.
    r = float(np.percentile(fg, 97))
    win = max(3, int(0.5 * r) | 1)
    peaks = (dist >= cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (win, win))))
    peaks &= dist >= max(2.0, 0.3 * r)
    peaks = cv2.dilate(peaks.astype(np.uint8) * 255, k3)
    n, markers = cv2.connectedComponents(peaks)
    markers = markers + 1
    unknown = cv2.subtract(cv2.dilate(mask, k3, iterations=2), peaks)
    markers[unknown > 0] = 0
    markers = cv2.watershed(img, markers)

    # Watershed lines (-1) separate the cells: 4-connected components of the cell labels are
    # the cells, with their areas, boxes and centroids from OpenCV.
    cells = ((markers > 1) & (mask > 0)).astype(np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(cells, connectivity=4)
    if n <= 1:
        return []
    x, y, bw, bh, area = (stats[1:, i] for i in range(5))
    min_area = max(6, 0.02 * float(np.median(area)))
    border = (x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)
    keep = (area >= min_area) & ~border
    return [[float(cx) + 0.5, float(cy) + 0.5] for cx, cy in centroids[1:][keep]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    rows = []
    for name in sorted(f for f in os.listdir(args.fields) if f.lower().endswith((".png", ".jpg"))):
        img = cv2.imread(os.path.join(args.fields, name), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"cannot decode {name}")
        best, centres = float("inf"), []
        for _ in range(max(1, args.reps)):
            t = cv2.getTickCount()
            centres = find_cells(img)
            best = min(best, (cv2.getTickCount() - t) / cv2.getTickFrequency())
        rows.append({"field": name, "ms": best * 1e3, "centres": centres})
    print(json.dumps({"fields": rows, "version": f"opencv {cv2.__version__}"}))


if __name__ == "__main__":
    main()
