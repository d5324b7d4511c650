"""scikit-learn's probes on fixed features, for the trainer's probe-agreement test.

Writes OUT_DIR/sklearn_probes.safetensors: train/test features and labels (overlapping Gaussian
classes, so that accuracies are well below 1 and disagreements would show), and the test
accuracies of LogisticRegression (lbfgs, multinomial, RedDino's C = 1 / l2 with
l2 = 100 / (dim * classes); the trainer's mean objective takes l2 / n_train) and KNeighborsClassifier (k = 1 and 20, Euclidean, uniform), and the test fold of every training
sample under StratifiedKFold(n_splits=5) (unshuffled).

Usage: python sklearn_probes.py OUT_DIR
"""
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier


def main(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(77)
    classes, dim, n_train, n_test = 6, 48, 900, 600
    centres = rng.normal(0, 1.0, (classes, dim))
    scale = rng.uniform(0.8, 1.6, classes)

    def draw(n):
        y = rng.integers(0, classes, n)
        x = centres[y] + rng.normal(0, 1, (n, dim)) * scale[y, None] * 3.0
        return x.astype(np.float32), y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    l2 = 100.0 / (dim * classes)
    lr = LogisticRegression(C=1.0 / l2, max_iter=5000, tol=1e-8).fit(xtr, ytr)
    acc = {"logreg": lr.score(xte, yte)}
    for k in (1, 20):
        acc[f"knn{k}"] = KNeighborsClassifier(n_neighbors=k).fit(xtr, ytr).score(xte, yte)
    # RedDino's cross-validation folds: unshuffled StratifiedKFold(5) on the training labels.
    kfold = np.zeros(n_train, dtype=np.int64)
    for f, (_, test) in enumerate(StratifiedKFold(n_splits=5).split(xtr, ytr)):
        kfold[test] = f
    save_file({
        "kfold5": torch.from_numpy(kfold),
        "x_train": torch.from_numpy(xtr), "y_train": torch.from_numpy(ytr),
        "x_test": torch.from_numpy(xte), "y_test": torch.from_numpy(yte),
        "acc": torch.tensor([acc["logreg"], acc["knn1"], acc["knn20"]], dtype=torch.float64),
        "l2": torch.tensor([l2 / n_train], dtype=torch.float64),
    }, os.path.join(out, "sklearn_probes.safetensors"))
    print(f"scikit-learn probe references written to {out}: {acc}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
