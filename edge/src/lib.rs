//! `reddino-edge`: the clinic service (capture -> cells -> infer -> classify -> publish).
//! The pipeline stages land here; the shared contract lives in `reddino-models`.
pub mod cells;
