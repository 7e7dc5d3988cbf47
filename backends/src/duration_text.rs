//! Serde for durations in configuration: a human string (`"5s"`, `"500ms"`,
//! `"2m"`) or a whole number of seconds. Shared by every config section that
//! takes a duration (`#[serde(with = "torus_backends::duration_text")]`).

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            serde::de::Error::custom(format!("bad duration {t:?}: {e} (examples: 5s, 500ms)"))
        }),
    }
}
