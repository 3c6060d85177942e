//! Writing documents to Chroma: records, batching, upsert-then-prune, moves and deletions. Issue 5.
