//! The server's background jobs, one per file: following the store's
//! change feed, flushing live node status, expiring stale TXT values,
//! checking customers' domains, publishing HTTPS records for HTTP/3.

pub mod challenge_expiry;
pub mod change_feed;
pub mod domain_check;
pub mod http3_records;
pub mod status_flush;
