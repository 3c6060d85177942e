//! Integration tests: one binary (quick to link), one module per area.
//! They use the real parts: a real `chroma run` server, the real PDFium library, real files.

mod common;

mod agent;
mod api;
mod chroma_client;
mod config;
mod doctor;
mod embed;
mod extract;
mod managed_chroma;
mod pdfium;
mod repair;
mod search;
mod service;
mod state;
mod sync;
mod watch;
