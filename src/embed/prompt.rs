//! Token ids of ColPali's two prompts, built explicitly so they do not depend on a tokenizer's
//! post-processor: `<bos>` is looked up by name, the rest is encoded without special tokens.
//!
//! document: `<image>`×N, `<bos>`, `Describe the image.`, `\n`
//! query:    `<bos>`, `Question: {q}`, `<pad>`×10, `\n` (the pads are real tokens, kept)

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::EmbedError;

pub const DOCUMENT_PROMPT: &str = "Describe the image.\n";
pub const QUERY_PREFIX: &str = "Question: ";
/// colpali-engine's query augmentation: ten `<pad>` tokens, then a new line.
pub const QUERY_SUFFIX: &str = "<pad><pad><pad><pad><pad><pad><pad><pad><pad><pad>\n";

pub struct Prompts {
    tokenizer: Tokenizer,
    path: PathBuf,
    bos: u32,
    /// `<bos>` and the document prompt: what follows the image tokens.
    document_suffix: Vec<u32>,
}

impl Prompts {
    pub fn load(path: &Path) -> Result<Prompts, EmbedError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| EmbedError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let token = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| EmbedError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("it has no `{name}` token, which ColPali's prompts need"),
                })
        };
        let bos = token("<bos>")?;
        token("<pad>")?;
        let mut p = Prompts {
            tokenizer,
            path: path.to_path_buf(),
            bos,
            document_suffix: Vec::new(),
        };
        let mut suffix = vec![bos];
        suffix.extend(p.encode(DOCUMENT_PROMPT)?);
        p.document_suffix = suffix;
        Ok(p)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids after the image tokens: `<bos>`, `Describe the image.`, `\n`.
    pub fn document_suffix(&self) -> &[u32] {
        &self.document_suffix
    }

    /// A whole page sequence, image tokens included.
    pub fn document_ids(&self, image_token: u32, image_tokens: usize) -> Vec<u32> {
        let mut ids = vec![image_token; image_tokens];
        ids.extend_from_slice(&self.document_suffix);
        ids
    }

    /// A query (or a text chunk, which DocuSearch embeds the same way).
    pub fn query_ids(&self, query: &str) -> Result<Vec<u32>, EmbedError> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode(&format!("{QUERY_PREFIX}{query}{QUERY_SUFFIX}"))?);
        Ok(ids)
    }
}
