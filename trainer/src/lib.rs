//! `reddino-trainer`: RedDino/DINOv2 pretraining, evaluation and bundle export.
//! The training code lands here; the shared contract lives in `reddino-models`.
