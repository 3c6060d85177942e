//! Chroma: the HTTP API v2 client and the managed `chroma run` server. Generic: what
//! DocuSearch's records hold is `crate::records`.

pub mod client;
pub mod managed;
