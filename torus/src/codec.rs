//! JSON encoding of metadata records, with errors that say which key was bad.

use serde::{de::DeserializeOwned, Serialize};
use torus_traits::{Error, Result};

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Other(format!("cannot encode record: {e}")))
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Corrupt(format!(
            "metadata record {} does not decode: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}
