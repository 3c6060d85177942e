//! The sled store: what we know about each file, and the durable job queue. Issue 6.
