//! File-system events (notify) and reconcile scans, turned into jobs. Issue 6.
