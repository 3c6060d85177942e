//! ColPali on candle: loading, preprocessing, the forward pass, batching. Issue 3.

pub mod cli;
pub mod preprocess;
