//! `reddino-edge`: the clinic service. Frames flow one way through modules named by what they
//! are: [`capture`] (frames) -> [`cells`] (crops) -> [`infer`] (embeddings, logits) ->
//! [`classify`] (classes, counts, sessions) -> [`analyze`] (per-image reports).

pub mod analyze;
pub mod app;
pub mod capture;
pub mod cells;
pub mod classify;
pub mod config;
pub mod crops;
pub mod demo;
pub mod import;
pub mod infer;
pub mod labelled;
pub mod messages;
pub mod mqtt;
pub mod outbox;
pub mod quality;
pub mod queue;
pub mod service;
