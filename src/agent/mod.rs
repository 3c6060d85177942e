//! The long-running agent and the one-shot `index`: watch → state → extract → embed → sync.

pub mod changes;
pub mod pipeline;
pub mod real;
pub mod report;
pub mod runtime;
pub mod stages;
pub mod status;
