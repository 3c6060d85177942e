//! The model's sizes, read from an HF PaliGemma `config.json`, with the defaults transformers
//! fills for keys a sparse config leaves out. Nothing model-sized is hard-coded elsewhere.

use serde::Deserialize;
use serde_json::Value;

/// SigLIP vision tower sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Image tokens per page: one per patch.
    pub fn num_patches(&self) -> usize {
        self.patches_per_side().pow(2)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Gemma language model sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
}

/// A ColPali (PaliGemma) checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ColPaliConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Width of the multi-modal projector's output (= the text hidden size).
    pub projection_dim: usize,
    pub image_token_index: u32,
    /// Width of ColPali's output vectors (`custom_text_proj`); 128 for every published ColPali.
    pub embedding_dim: usize,
}

/// Why a `config.json` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigJsonError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`{key}` is {found}; expected {expected}")]
    Bad {
        key: String,
        found: String,
        expected: String,
    },
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    vision_config: serde_json::Map<String, Value>,
    #[serde(default)]
    text_config: serde_json::Map<String, Value>,
    projection_dim: Option<usize>,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
}

fn get_usize(
    m: &serde_json::Map<String, Value>,
    section: &str,
    key: &str,
    default: Option<usize>,
) -> Result<usize, ConfigJsonError> {
    match m.get(key) {
        Some(v) if !v.is_null() => {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| ConfigJsonError::Bad {
                    key: format!("{section}.{key}"),
                    found: v.to_string(),
                    expected: "a non-negative integer".into(),
                })
        }
        _ => default.ok_or_else(|| ConfigJsonError::Bad {
            key: format!("{section}.{key}"),
            found: "missing".into(),
            expected: "a non-negative integer".into(),
        }),
    }
}

fn get_f64(m: &serde_json::Map<String, Value>, key: &str, default: f64) -> Option<f64> {
    match m.get(key) {
        Some(v) if !v.is_null() => v.as_f64(),
        _ => Some(default),
    }
}

fn check_activation(
    m: &serde_json::Map<String, Value>,
    section: &str,
) -> Result<(), ConfigJsonError> {
    // HF configs carry `hidden_act` and/or `hidden_activation` (one may be null). ColPali's
    // towers use the tanh approximation of GELU; anything else would silently be wrong.
    for key in ["hidden_activation", "hidden_act"] {
        if let Some(Value::String(s)) = m.get(key) {
            if s != "gelu_pytorch_tanh" && s != "gelu_fast" && s != "gelu_new" {
                return Err(ConfigJsonError::Bad {
                    key: format!("{section}.{key}"),
                    found: format!("{s:?}"),
                    expected:
                        "\"gelu_pytorch_tanh\" (the only activation this model code implements)"
                            .into(),
                });
            }
            return Ok(());
        }
    }
    Ok(())
}

impl ColPaliConfig {
    /// Parses a PaliGemma `config.json` (transformers 4.x or 5.x format).
    pub fn from_json(text: &str) -> Result<ColPaliConfig, ConfigJsonError> {
        let raw: Raw = serde_json::from_str(text)?;
        let v = &raw.vision_config;
        let t = &raw.text_config;
        // Defaults: transformers' SiglipVisionConfig as PaliGemmaConfig instantiates it.
        let vision = VisionConfig {
            hidden_size: get_usize(v, "vision_config", "hidden_size", Some(1152))?,
            intermediate_size: get_usize(v, "vision_config", "intermediate_size", Some(4304))?,
            num_hidden_layers: get_usize(v, "vision_config", "num_hidden_layers", Some(27))?,
            num_attention_heads: get_usize(v, "vision_config", "num_attention_heads", Some(16))?,
            num_channels: get_usize(v, "vision_config", "num_channels", Some(3))?,
            image_size: get_usize(v, "vision_config", "image_size", Some(224))?,
            patch_size: get_usize(v, "vision_config", "patch_size", Some(14))?,
            layer_norm_eps: get_f64(v, "layer_norm_eps", 1e-6).unwrap_or(1e-6),
        };
        check_activation(v, "vision_config")?;
        // Defaults: transformers' GemmaConfig as PaliGemmaConfig instantiates it (Gemma-2B).
        let hidden_size = get_usize(t, "text_config", "hidden_size", Some(2048))?;
        let num_attention_heads = get_usize(t, "text_config", "num_attention_heads", Some(8))?;
        // transformers 4.x: `rope_theta`; 5.x: `rope_parameters.rope_theta`.
        let rope_theta = t
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| t.get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        if let Some(kind) = t
            .get("rope_parameters")
            .and_then(|p| p.get("rope_type"))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                return Err(ConfigJsonError::Bad {
                    key: "text_config.rope_parameters.rope_type".into(),
                    found: format!("{kind:?}"),
                    expected: "\"default\" (plain RoPE)".into(),
                });
            }
        }
        let text = TextConfig {
            // The text config's vocab wins over a top-level `_vocab_size` / `vocab_size`.
            vocab_size: get_usize(t, "text_config", "vocab_size", Some(257_216))?,
            hidden_size,
            intermediate_size: get_usize(t, "text_config", "intermediate_size", Some(16384))?,
            num_hidden_layers: get_usize(t, "text_config", "num_hidden_layers", Some(18))?,
            num_attention_heads,
            num_key_value_heads: get_usize(t, "text_config", "num_key_value_heads", Some(1))?,
            head_dim: get_usize(t, "text_config", "head_dim", Some(256))?,
            rms_norm_eps: get_f64(t, "rms_norm_eps", 1e-6).unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: get_usize(
                t,
                "text_config",
                "max_position_embeddings",
                Some(8192),
            )?,
        };
        check_activation(t, "text_config")?;
        let cfg = ColPaliConfig {
            projection_dim: raw.projection_dim.unwrap_or(2048),
            image_token_index: raw
                .image_token_index
                .or(raw.image_token_id)
                .unwrap_or(257_152),
            embedding_dim: 128,
            vision,
            text,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigJsonError> {
        let bad = |key: &str, found: String, expected: &str| ConfigJsonError::Bad {
            key: key.into(),
            found,
            expected: expected.into(),
        };
        let v = &self.vision;
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(bad(
                "vision_config.image_size",
                v.image_size.to_string(),
                &format!("a multiple of patch_size ({})", v.patch_size),
            ));
        }
        if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
            return Err(bad(
                "vision_config.num_attention_heads",
                v.num_attention_heads.to_string(),
                &format!("a divisor of hidden_size ({})", v.hidden_size),
            ));
        }
        let t = &self.text;
        if t.num_key_value_heads == 0 || t.num_attention_heads % t.num_key_value_heads != 0 {
            return Err(bad(
                "text_config.num_key_value_heads",
                t.num_key_value_heads.to_string(),
                &format!(
                    "a divisor of num_attention_heads ({})",
                    t.num_attention_heads
                ),
            ));
        }
        if t.head_dim % 2 != 0 {
            return Err(bad(
                "text_config.head_dim",
                t.head_dim.to_string(),
                "an even number (RoPE)",
            ));
        }
        if self.projection_dim != t.hidden_size {
            return Err(bad(
                "projection_dim",
                self.projection_dim.to_string(),
                &format!("the text hidden size ({})", t.hidden_size),
            ));
        }
        if self.image_token_index as usize >= t.vocab_size {
            return Err(bad(
                "image_token_index",
                self.image_token_index.to_string(),
                &format!("an id below text_config.vocab_size ({})", t.vocab_size),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_config_gets_transformers_defaults() {
        let cfg = ColPaliConfig::from_json(
            r#"{"vision_config": {"image_size": 448}, "text_config": {}}"#,
        )
        .expect("a sparse config is valid");
        assert_eq!(cfg.vision.num_patches(), 1024);
        assert_eq!(cfg.text.head_dim, 256);
        assert_eq!(cfg.image_token_index, 257_152);
    }

    #[test]
    fn rope_parameters_win_and_bad_values_are_named() {
        let cfg = ColPaliConfig::from_json(
            r#"{"projection_dim": 64, "image_token_index": 4, "vision_config": {"image_size": 28},
                "text_config": {"hidden_size": 64, "vocab_size": 10,
                                "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}}"#,
        )
        .expect("valid");
        assert_eq!(cfg.text.rope_theta, 500.0);
        let err = ColPaliConfig::from_json(r#"{"vision_config": {"image_size": 30}}"#)
            .expect_err("30 is not a multiple of 14");
        assert!(
            err.to_string().contains("vision_config.image_size"),
            "{err}"
        );
    }
}
