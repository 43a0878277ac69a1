//! Kubernetes quantity syntax for the two resources a task may ask for.
//!
//! Tasks and the tenants file speak Kubernetes (`"500m"`, `"1.5"`, `"256Mi"`, `"1G"`) so the same
//! values work for the local sandbox and for Pod limits. Internally we keep integers: CPU in
//! millicores and memory in bytes, so comparisons and sums are exact.

use std::fmt;

/// The least memory a task may ask for (or a tenant give by default): below it the runtimes
/// do not start.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;

/// Why a quantity string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantityError {}

/// Splits `"1.5Gi"` into the decimal number scaled by 1000 (`1500`) and the suffix (`"Gi"`).
/// Scaling by 1000 keeps three decimal places, enough for millicores.
fn split(s: &str) -> Result<(u128, &str), QuantityError> {
    let s = s.trim();
    if s.is_empty() || s.len() > 32 {
        return Err(QuantityError(format!("{s:?} is not a quantity")));
    }
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int.is_empty() && frac.is_empty()) || frac.len() > 3 || frac.contains('.') {
        return Err(QuantityError(format!(
            "{s:?} is not a quantity (use forms like \"500m\", \"2\", \"256Mi\", \"1Gi\")"
        )));
    }
    let parse = |d: &str| -> Result<u128, QuantityError> {
        if d.is_empty() {
            return Ok(0);
        }
        d.parse::<u128>().map_err(|_| QuantityError(format!("{s:?} is too large")))
    };
    let mut frac_scaled = parse(frac)?;
    for _ in frac.len()..3 {
        frac_scaled *= 10;
    }
    let milli = parse(int)?
        .checked_mul(1000)
        .and_then(|v| v.checked_add(frac_scaled))
        .ok_or_else(|| QuantityError(format!("{s:?} is too large")))?;
    Ok((milli, suffix))
}

/// A decimal exponent suffix (`e3`, `E-2`, `e+6`), as Kubernetes allows (`"5e8"` bytes). A bare
/// `E` is not one: it is the exa suffix. Bounded so that scaling cannot overflow.
fn exponent(suffix: &str) -> Option<i32> {
    let rest = suffix.strip_prefix(['e', 'E'])?;
    let digits = rest.strip_prefix(['+', '-']).unwrap_or(rest);
    if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// `value × 10^exp`, exactly, or `None` when that is not a whole number or too large.
fn scale10(value: u128, exp: i32) -> Option<u128> {
    let factor = 10u128.checked_pow(exp.unsigned_abs())?;
    if exp >= 0 {
        value.checked_mul(factor)
    } else if value.is_multiple_of(factor) {
        Some(value / factor)
    } else {
        None
    }
}

/// Parses a CPU quantity into millicores: `"500m"` → 500, `"2"` → 2000, `"0.25"` → 250,
/// `"25e-2"` → 250.
pub fn parse_cpu_millis(s: &str) -> Result<u64, QuantityError> {
    let (milli, suffix) = split(s)?;
    let value = match suffix {
        "" => milli,
        e if exponent(e).is_some() => scale10(milli, exponent(e).unwrap_or(0))
            .ok_or_else(|| QuantityError(format!("{s:?}: millicores must be whole")))?,
        "m" => {
            if milli % 1000 != 0 {
                return Err(QuantityError(format!("{s:?}: millicores must be whole")));
            }
            milli / 1000
        }
        _ => return Err(QuantityError(format!("{s:?} is not a CPU quantity (use \"500m\" or \"2\")"))),
    };
    u64::try_from(value).map_err(|_| QuantityError(format!("{s:?} is too large")))
}

/// Parses a memory quantity into bytes: `"256Mi"`, `"1Gi"`, `"1G"`, `"1000"`, `"5e8"`.
pub fn parse_memory_bytes(s: &str) -> Result<u64, QuantityError> {
    let (milli, suffix) = split(s)?;
    if let Some(exp) = exponent(suffix) {
        // milli is thousandths of the number: one more factor of 10^-3 to get bytes.
        let bytes = scale10(milli, exp - 3)
            .or_else(|| scale10(milli, exp).map(|v| v / 1000))
            .ok_or_else(|| QuantityError(format!("{s:?} is too large")))?;
        return u64::try_from(bytes).map_err(|_| QuantityError(format!("{s:?} is too large")));
    }
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "P" => 1000u128.pow(5),
        "E" => 1000u128.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(QuantityError(format!("{s:?} is not a memory quantity (use \"256Mi\", \"1Gi\" or bytes)"))),
    };
    let bytes = milli.checked_mul(multiplier).ok_or_else(|| QuantityError(format!("{s:?} is too large")))? / 1000;
    u64::try_from(bytes).map_err(|_| QuantityError(format!("{s:?} is too large")))
}

/// Formats millicores the way Kubernetes prints them (`"500m"`, `"2"`).
pub fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest exact binary suffix (`"256Mi"`), else plain bytes.
pub fn format_memory(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("0.25"), Ok(250));
        assert_eq!(parse_cpu_millis("1.5"), Ok(1500));
        assert_eq!(parse_cpu_millis(".5"), Ok(500));
        // Kubernetes' decimal exponent.
        assert_eq!(parse_cpu_millis("25e-2"), Ok(250));
        assert_eq!(parse_cpu_millis("1e3"), Ok(1_000_000));
        assert_eq!(parse_cpu_millis("2E0"), Ok(2000));
        for bad in ["", "m", "-1", "1.2345", "2Gi", "1e", "1e-4", "1e999", "1e+", "0.5m", "1..2", "abc"] {
            assert!(parse_cpu_millis(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn memory_forms() {
        assert_eq!(parse_memory_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(parse_memory_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory_bytes("4096"), Ok(4096));
        // Kubernetes' decimal exponent; a bare E is still exa.
        assert_eq!(parse_memory_bytes("5e8"), Ok(500_000_000));
        assert_eq!(parse_memory_bytes("1.5e3"), Ok(1500));
        assert_eq!(parse_memory_bytes("128E+6"), Ok(128_000_000));
        assert_eq!(parse_memory_bytes("1E"), Ok(1_000_000_000_000_000_000));
        for bad in ["", "Mi", "-5Mi", "1Zi", "1 Gi", "99999999999999999999999999999Ei", "1e", "1e99", "1ee3"] {
            assert!(parse_memory_bytes(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format_cpu(500), "500m");
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_memory(256 << 20), "256Mi");
        assert_eq!(format_memory(1 << 30), "1Gi");
        assert_eq!(format_memory(1000), "1000");
        for s in ["500m", "2", "256Mi", "1Gi"] {
            let back = if s.ends_with('i') {
                format_memory(parse_memory_bytes(s).unwrap())
            } else {
                format_cpu(parse_cpu_millis(s).unwrap())
            };
            assert_eq!(back, s);
        }
    }
}
