//! Integration tests: one binary (quick to link), one module per area.
//! They use the real parts: a real `chroma run` server, the real PDFium library, real files.

// Tests set the fields of a default configuration one by one, where the test reads best.
#![allow(clippy::field_reassign_with_default)]

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
mod repo;
mod search;
mod service;
mod state;
mod sync;
mod watch;
mod web;
