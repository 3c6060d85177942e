//! Chroma: the HTTP API v2 client, the record format, and the managed `chroma run` server.

pub mod client;
pub mod managed;
pub mod records;
