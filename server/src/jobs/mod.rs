//! The server's background jobs, one per file: following the store's
//! change feed, flushing live node status, expiring stale TXT values,
//! checking customers' domains.

pub mod challenge_expiry;
pub mod change_feed;
pub mod domain_check;
pub mod status_flush;
