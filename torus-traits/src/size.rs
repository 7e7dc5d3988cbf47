//! Human byte sizes: `1GiB`, `512MiB`, `10G`, `4096`.
//!
//! Binary suffixes (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024; decimal
//! ones (`K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB`) are powers of 1000, as in the
//! original Torus (go-humanize). Displayed sizes use binary units (`5.0 GiB`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A number of bytes that parses from and prints as a human size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = crate::Error;

    fn from_str(input: &str) -> crate::Result<Self> {
        let bad = |why: &str| {
            crate::Error::InvalidArgument(format!(
                "bad size {input:?}: {why} (examples: 1GiB, 512MiB, 10G, 4096)"
            ))
        };
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(bad("no number"));
        }
        let unit = unit.trim();
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "p" | "pb" => 1_000_000_000_000_000,
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            "pi" | "pib" => 1 << 50,
            _ => return Err(bad("unknown unit")),
        };
        let value = if let Some((whole, frac)) = num.split_once('.') {
            let whole: u64 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| bad("bad number"))?
            };
            if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
                return Err(bad("bad number"));
            }
            let scale = 10u64.pow(frac.len() as u32);
            let frac: u64 = frac.parse().map_err(|_| bad("bad number"))?;
            let w = whole.checked_mul(mult).ok_or_else(|| bad("too large"))?;
            let f = (frac as u128 * mult as u128 / scale as u128) as u64;
            w.checked_add(f).ok_or_else(|| bad("too large"))?
        } else {
            let n: u64 = num.parse().map_err(|_| bad("bad number"))?;
            n.checked_mul(mult).ok_or_else(|| bad("too large"))?
        };
        Ok(ByteSize(value))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut i = 0;
        while v >= 1024.0 && i < UNITS.len() - 1 {
            v /= 1024.0;
            i += 1;
        }
        write!(f, "{v:.1} {}", UNITS[i])
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"5GiB\", \"512MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size must not be negative: {v}")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse()
                    .map_err(|e: crate::Error| E::custom(e.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!("1GiB".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("10G".parse::<ByteSize>().unwrap().0, 10_000_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap().0, 1536);
        assert_eq!("5gib".parse::<ByteSize>().unwrap().0, 5 << 30);
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "GiB",
            "1XB",
            "-1",
            "1..2G",
            "99999999999999999999",
            "20000000PiB",
        ] {
            assert!(s.parse::<ByteSize>().is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn displays_like_the_original() {
        assert_eq!(ByteSize(5 << 30).to_string(), "5.0 GiB");
        assert_eq!(ByteSize(0).to_string(), "0 B");
        assert_eq!(ByteSize(1536).to_string(), "1.5 KiB");
    }

    proptest::proptest! {
        #[test]
        fn display_then_parse_is_close(n in 0u64..(1u64 << 50)) {
            let shown = ByteSize(n).to_string().replace(' ', "");
            let back: ByteSize = shown.parse().unwrap();
            // One decimal place: within 5% (or exact below 1 KiB).
            let diff = back.0.abs_diff(n) as f64;
            proptest::prop_assert!(diff <= n as f64 * 0.05 + 1.0);
        }

        #[test]
        fn never_panics(s in ".{0,20}") {
            let _ = s.parse::<ByteSize>();
        }
    }
}
