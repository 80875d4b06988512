//! `parlor migrate`: a single-node SQLite chat database copied into PostgreSQL.

use std::path::Path;

use crate::chat::store::{CopySummary, StoreError};

/// Copies `dir/chat.db` into the (empty) PostgreSQL database at `url`.
pub fn migrate_from_sqlite(dir: &Path, url: &str) -> Result<CopySummary, StoreError> {
    let _ = (dir, url);
    Err(StoreError::Sql {
        context: "migrate from sqlite",
        source: "not implemented yet".into(),
    })
}
