//! The local status API (`/health`, `/status`, `/metrics`, `/rescan`) on 127.0.0.1. Issue 7.
