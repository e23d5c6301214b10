//! The store's error type: no driver type in it, so callers never depend on
//! the backend.

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (stopped, unreachable, timed
    /// out, connection lost). Nothing was written; retrying later may work.
    #[error("store {store} is unavailable: {reason}")]
    Unavailable {
        /// The store, without secrets.
        store: String,
        /// What the driver said.
        reason: String,
    },
    /// The write conflicts with what is stored (a node name that exists).
    #[error("{0}")]
    Conflict(String),
    /// What was asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request or the configuration is invalid (names the field).
    #[error("{0}")]
    Invalid(String),
    /// A copy target already holds data.
    #[error("store {store} is not empty ({what}); copy only into an empty store")]
    NotEmpty {
        /// The target, without secrets.
        store: String,
        /// What is there.
        what: String,
    },
    /// The schema is newer than this binary understands.
    #[error(
        "store {store} has schema version {found}, newer than this edge-server ({supported}); upgrade edge-server"
    )]
    SchemaTooNew {
        /// The store, without secrets.
        store: String,
        /// Version found.
        found: i64,
        /// Highest version this binary knows.
        supported: i64,
    },
    /// Stored data could not be decoded.
    #[error("store {store}: corrupt row: {what}")]
    Corrupt {
        /// The store, without secrets.
        store: String,
        /// What was wrong.
        what: String,
    },
    /// The database refused a statement for another reason.
    #[error("store {store}: {message}")]
    Backend {
        /// The store, without secrets.
        store: String,
        /// The driver's message.
        message: String,
    },
}

impl StoreError {
    /// Whether the database was unreachable (the API answers 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}
