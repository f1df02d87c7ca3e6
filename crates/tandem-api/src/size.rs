//! Byte sizes as people write them: `512`, `4K`, `10G`, `1.5T` (binary units).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {input:?} as a size: {why} (write e.g. 512, 64K, 10G or 1.5T)")]
pub struct SizeError {
    input: String,
    why: &'static str,
}

const UNITS: [(char, u32); 5] = [('B', 0), ('K', 10), ('M', 20), ('G', 30), ('T', 40)];

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(input: &str) -> Result<Self, SizeError> {
        let err = |why| SizeError {
            input: input.to_owned(),
            why,
        };
        let s = input.trim();
        // Accept "10G", "10GB", "10GiB" and "10 G" alike.
        let s = s
            .strip_suffix("iB")
            .or_else(|| s.strip_suffix("ib"))
            .unwrap_or(s);
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = (&s[..split], s[split..].trim());
        let unit = unit
            .strip_suffix(['B', 'b'])
            .filter(|u| !u.is_empty())
            .unwrap_or(unit);
        let shift = match unit.chars().next().map(|c| c.to_ascii_uppercase()) {
            None => 0,
            Some(c) if unit.len() == 1 => UNITS
                .iter()
                .find(|(u, _)| *u == c)
                .map(|(_, shift)| *shift)
                .ok_or_else(|| err("unknown unit"))?,
            Some(_) => return Err(err("unknown unit")),
        };
        if number.is_empty() {
            return Err(err("no number"));
        }
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(err("not a number"));
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err("not a number"))?
        };
        let mut bytes = whole
            .checked_shl(shift)
            .filter(|b| b >> shift == whole)
            .ok_or_else(|| err("too large"))?;
        if !frac.is_empty() {
            // Fractions are exact enough for sizes: compute with 18 decimal digits at most.
            let digits = &frac[..frac.len().min(18)];
            let num: u128 = digits.parse().map_err(|_| err("not a number"))?;
            let den = 10u128.pow(digits.len() as u32);
            let extra = (num << shift) / den;
            bytes = bytes
                .checked_add(extra as u64)
                .ok_or_else(|| err("too large"))?;
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    /// Exact sizes print with their largest exact unit (`10G`); others with two decimals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for &(unit, shift) in UNITS.iter().rev() {
            if shift == 0 {
                break;
            }
            if b >= 1 << shift {
                return if b % (1 << shift) == 0 {
                    write!(f, "{}{unit}", b >> shift)
                } else {
                    write!(f, "{:.2}{unit}", b as f64 / (1u64 << shift) as f64)
                };
            }
        }
        write!(f, "{b}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> u64 {
        s.parse::<ByteSize>().unwrap().0
    }

    #[test]
    fn parses_binary_units() {
        assert_eq!(parse("512"), 512);
        assert_eq!(parse("4K"), 4096);
        assert_eq!(parse("4k"), 4096);
        assert_eq!(parse("10G"), 10 << 30);
        assert_eq!(parse("10GiB"), 10 << 30);
        assert_eq!(parse("10 GB"), 10 << 30);
        assert_eq!(parse("1.5T"), 3 << 39);
        assert_eq!(parse("2T"), 2 << 40);
        assert_eq!(parse("0"), 0);
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for s in [
            "",
            "G",
            "1X",
            "1.2.3G",
            "-1G",
            "abc",
            "1GG",
            "99999999999T",
            ".",
        ] {
            assert!(s.parse::<ByteSize>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn displays_largest_exact_unit() {
        assert_eq!(ByteSize(10 << 30).to_string(), "10G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.50G");
        assert_eq!(ByteSize(4096).to_string(), "4K");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }
}
