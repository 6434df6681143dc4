//! One parser for sizes and `-o key=value` option values, shared by the command line and every
//! format's `create` (qemu-img's conventions: `64K`, `2G`, `1.5` is not a size; `on`/`off`).

use crate::error::{Error, Result};

/// Parse sizes like 4096, 64K, 16M, 2G, 1T (powers of 1024; optional trailing B/iB; any case).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(format!("invalid size suffix in {s:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} too large"))
}

/// A size-valued `-o` option of format `fmt`.
pub fn opt_size(fmt: &str, key: &str, value: &str) -> Result<u64> {
    parse_size(value).map_err(|e| Error::invalid(format!("{fmt}: {key}={value}: {e}")))
}

/// A size-valued `-o` option that must fit in a u32.
pub fn opt_size_u32(fmt: &str, key: &str, value: &str) -> Result<u32> {
    u32::try_from(opt_size(fmt, key, value)?)
        .map_err(|_| Error::invalid(format!("{fmt}: {key}={value} is too large")))
}

/// An on/off `-o` option of format `fmt`.
pub fn opt_bool(fmt: &str, key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(Error::invalid(format!(
            "{fmt}: {key}={value}: expected on or off"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999E").is_err());
        assert_eq!(opt_size_u32("qed", "cluster_size", "4k").unwrap(), 4096);
        assert!(opt_size_u32("qed", "cluster_size", "8G").is_err());
    }

    #[test]
    fn bools() {
        assert!(opt_bool("x", "k", "on").unwrap());
        assert!(!opt_bool("x", "k", "off").unwrap());
        let e = opt_bool("qcow2", "lazy_refcounts", "maybe").unwrap_err();
        assert!(e.to_string().contains("lazy_refcounts=maybe"), "{e}");
    }
}
