//! Synthetic smears.
