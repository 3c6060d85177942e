//! Chroma: the HTTP API v2 client and the managed `chroma run` server.

pub mod managed;
