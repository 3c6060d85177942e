//! Element-wise kernels on the model's hot path.

use candle_core::{Result, Tensor};

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    xs.gelu()
}
