//! What PostgreSQL stores for a value the driver sends, computed here so that a statement can answer
//! with the row it wrote without reading the row back (see `job_insert_batch`).
//!
//! Two things change on the way in: a `timestamptz` keeps whole microseconds, and a `jsonb` number
//! is parsed by `numeric_in` and printed by `numeric_out`, which writes exponents out and has no
//! negative zero (`2.5e-7` is stored as `0.00000025`, `1.50e1` as `15.0`, `-0.0` as `0.0`). Everything
//! else a `serde_json::Value` can hold comes back as sent: strings are already unescaped, objects are
//! already ordered and deduplicated the way both sides print them. The test
//! `a_batch_answers_each_job_exactly_as_stored` compares these against real rows.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Number, Value};

/// `t` as stored: whole microseconds since 2000-01-01, truncated toward that epoch, which is what
/// postgres-types' `ToSql` for `DateTime` sends.
pub fn time(t: DateTime<Utc>) -> DateTime<Utc> {
    let epoch = DateTime::from_timestamp(946_684_800, 0).expect("2000-01-01 is a valid time");
    match (t - epoch).num_microseconds() {
        Some(us) => epoch + TimeDelta::microseconds(us),
        None => t,
    }
}

/// Rewrites every number in `v` the way a `jsonb` column prints it back.
pub fn json(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(canonical) = numeric(n.as_str()) {
                // The canonical text is a JSON number too (digits, an optional fraction).
                if let Ok(parsed) = canonical.parse::<Number>() {
                    *n = parsed;
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json),
        Value::Object(map) => map.values_mut().for_each(json),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

/// `numeric_out(numeric_in(s))` for a JSON number `s`, or `None` when that is `s` itself (no exponent,
/// not a negative zero: the common case, which allocates nothing).
fn numeric(s: &str) -> Option<String> {
    if !s.starts_with('-') && !s.bytes().any(|b| b == b'e' || b == b'E') {
        return None;
    }
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let zero = int.bytes().chain(frac.bytes()).all(|b| b == b'0');
    let Some(exponent) = exponent else {
        return (negative && zero).then(|| s[1..].to_string());
    };
    // An exponent this large makes a number PostgreSQL refuses (its scale or weight overflows): the
    // insert fails, so there is nothing to answer.
    let exponent: i64 = exponent.parse().ok().filter(|e: &i64| e.abs() <= 1_000_000)?;
    // numeric_in: the digits, the decimal point moved by the exponent, and a display scale of the
    // fraction's digits less the exponent, never below zero. Then numeric_out prints that scale.
    let digits = format!("{int}{frac}");
    let point = int.len() as i64 + exponent;
    let scale = (frac.len() as i64 - exponent).max(0) as usize;
    let (whole, fraction) = if point <= 0 {
        (String::new(), format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize)))
    } else if point as usize >= digits.len() {
        (format!("{digits}{}", "0".repeat(point as usize - digits.len())), String::new())
    } else {
        (digits[..point as usize].to_string(), digits[point as usize..].to_string())
    };
    debug_assert_eq!(fraction.len(), scale, "the scale is exactly the digits after the point");
    let whole = whole.trim_start_matches('0');
    let mut out = String::with_capacity(whole.len() + scale + 3);
    if negative && !zero {
        out.push('-');
    }
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if scale > 0 {
        out.push('.');
        out.push_str(&fraction);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_as_numeric_prints_them() {
        for (sent, stored) in [
            ("1", "1"),
            ("-12", "-12"),
            ("1.50", "1.50"),
            ("0.0", "0.0"),
            ("-0", "0"),
            ("-0.000", "0.000"),
            ("1e3", "1000"),
            ("1E+3", "1000"),
            ("1.50e1", "15.0"),
            ("1.5e1", "15"),
            ("2.5e-7", "0.00000025"),
            ("-2.5E-7", "-0.00000025"),
            ("123.456e-2", "1.23456"),
            ("0e5", "0"),
            ("0.0e-2", "0.000"),
            ("-0e0", "0"),
            ("10e-1", "1.0"),
            ("12e-1", "1.2"),
            ("0.012e1", "0.12"),
            ("5e-1", "0.5"),
        ] {
            assert_eq!(numeric(sent).as_deref().unwrap_or(sent), stored, "{sent}");
        }
    }

    #[test]
    fn a_value_is_rewritten_throughout() {
        let mut v: Value = serde_json::from_str(r#"{"a": [1e2, {"b": -0.0}], "c": "1e2", "d": 7}"#).unwrap();
        json(&mut v);
        assert_eq!(v.to_string(), r#"{"a":[100,{"b":0.0}],"c":"1e2","d":7}"#);
    }

    #[test]
    fn times_keep_whole_microseconds_toward_2000() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(time(t("2031-02-03T04:05:06.123456789Z")), t("2031-02-03T04:05:06.123456Z"));
        assert_eq!(time(t("1999-12-31T23:59:59.999999999Z")), t("2000-01-01T00:00:00Z"));
        assert_eq!(time(t("1999-12-31T23:59:58.500000500Z")), t("1999-12-31T23:59:58.500001Z"));
        assert_eq!(time(t("1970-01-01T00:00:00.000000500Z")), t("1970-01-01T00:00:00.000001Z"));
    }
}
