//! `reddino-edge`: the clinic service. A frame goes one way through the stages, each in its
//! own module:
//!
//! - [`capture`]: frame sources (V4L2 camera, replayed files, the synthetic microscope).
//! - [`cells`]: the cell finder, one file per step.
//! - [`crop`]: cells cut out as the model's crop policy asks.
//! - [`infer`]: inference backends, crops to predictions.
//! - [`classify`]: classes, per-frame counts, sessions.
//! - [`pipeline`]: the stage threads and queues, the service state, commands.
//! - [`publish`]: the outbox, the messages, the delivery state, the MQTT event loop.
//!
//! Around them: [`config`] (the TOML config, made of each stage's section), [`model`] (opening
//! a bundle, the same for every command), [`app`] (`reddino-edge run`: the wiring),
//! [`offline`] (analysis of image files, data-set import, finder quality, the demo),
//! [`switch`] (serving a newly activated model without a restart, its health check),
//! [`supervise`] (readiness and watchdog for systemd), [`memory`] (frame buffers reused
//! between frames) and [`error`] (the commands' error and exit status).

pub mod app;
pub mod capture;
pub mod cells;
pub mod classify;
pub mod config;
pub mod crop;
pub mod error;
pub mod infer;
pub mod memory;
pub mod model;
pub mod offline;
pub mod pipeline;
pub mod publish;
pub mod supervise;
pub mod switch;
