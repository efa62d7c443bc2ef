//! Kubernetes resource quantities (`512Mi`, `1Gi`, `1G`, `1.5Gi`, `2e9`, `1000000`) as bytes.
//!
//! The grammar is apimachinery's: an optional sign, a decimal number, and one suffix out of
//! the binary SI ones (`Ki` .. `Ei`), the decimal SI ones (`n`, `u`, `m`, none, `k`, `M`,
//! `G`, `T`, `P`, `E`) or a decimal exponent (`e3`, `E-2`). A fraction of a byte rounds up,
//! as `Quantity.Value()` does.

/// Why a quantity does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "{0:?} is not a quantity; write a number with an optional suffix such as 512Mi, 1Gi or 2G"
    )]
    Syntax(String),
    #[error("{0:?} is negative; a size must be positive")]
    Negative(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses `text` as a number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax(text.to_string());
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(syntax());
    }
    // value = mantissa * 2^binary * 10^decimal / 10^fraction_digits
    let (binary, decimal): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        exp if exp.starts_with(['e', 'E']) => {
            let digits = &exp[1..];
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            (0, digits.parse().map_err(|_| syntax())?)
        }
        _ => return Err(syntax()),
    };
    let too_large = || QuantityError::TooLarge(text.to_string());
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    let mantissa: u128 = if digits.is_empty() {
        0
    } else if digits.len() > 30 {
        return Err(too_large());
    } else {
        digits.parse().map_err(|_| syntax())?
    };
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(text.to_string()));
    }
    let pow10 = |e: i64| -> Result<u128, QuantityError> {
        u32::try_from(e)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .ok_or_else(too_large)
    };
    let scale = i64::from(decimal) - fraction.len() as i64;
    let mut numerator = mantissa.checked_shl(binary).ok_or_else(too_large)?;
    if mantissa != 0 && numerator >> binary != mantissa {
        return Err(too_large());
    }
    let mut denominator = 1u128;
    if scale >= 0 {
        numerator = numerator.checked_mul(pow10(scale)?).ok_or_else(too_large)?;
    } else if mantissa != 0 {
        // A tiny value over a huge power of ten is still at least one byte.
        denominator = pow10(-scale).unwrap_or(u128::MAX);
    }
    let bytes = numerator.div_ceil(denominator);
    u64::try_from(bytes).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantity_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("64k"), Ok(64_000));
        assert_eq!(parse_bytes("2Ki"), Ok(2048));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("+3M"), Ok(3_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn quantity_exponents_and_fractions_round_up() {
        assert_eq!(parse_bytes("2e9"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1E3"), Ok(1000));
        assert_eq!(parse_bytes("15e-1"), Ok(2));
        assert_eq!(parse_bytes("500m"), Ok(1));
        assert_eq!(parse_bytes("1n"), Ok(1));
        assert_eq!(parse_bytes("0.1Ki"), Ok(103));
        assert_eq!(parse_bytes(".5Ki"), Ok(512));
    }

    #[test]
    fn quantity_rejects_junk() {
        for bad in [
            "", "Mi", "1.2.3Mi", "12MB", "1 Gi", "1gi", "e3", "1e", "1e+", "abc", ".",
        ] {
            assert!(
                matches!(parse_bytes(bad), Err(QuantityError::Syntax(_))),
                "{bad:?} parsed"
            );
        }
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_bytes("16Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("1e40"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("99999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(_))
        ));
    }
}
