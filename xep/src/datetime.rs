//! XEP-0082 date-times: UTC `CCYY-MM-DDThh:mm:ss[.ffffff]Z` from and to microseconds since the
//! Unix epoch. Hand-written (a dozen lines of calendar arithmetic) rather than pulling a date
//! crate into every module for two functions.

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Formats microseconds since the epoch as an XEP-0082 DateTime in UTC, with a fraction only
/// when there is one (`2010-07-10T23:08:25Z`, `2010-07-10T23:08:25.000123Z`).
pub fn format_datetime(micros: u64) -> String {
    let secs = (micros / 1_000_000) as i64;
    let frac = micros % 1_000_000;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    );
    if frac != 0 {
        s.push_str(&format!(".{frac:06}"));
    }
    s.push('Z');
    s
}

/// Parses an XEP-0082 DateTime (`CCYY-MM-DDThh:mm:ss[.sss](Z|(+|-)hh:mm)`) into microseconds
/// since the epoch (negative before 1970); digits beyond microseconds are dropped.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let month_days = match mo {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if d < 1 || d > month_days || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut frac = 0;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut f = r[..digits.min(6)].to_owned();
        while f.len() < 6 {
            f.push('0');
        }
        frac = f.parse().ok()?;
        rest = &r[digits..];
    }
    let offset = match rest.as_bytes() {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from((a - b'0') * 10 + (b - b'0')))
            };
            let (oh, om) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs * 1_000_000 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_spec_examples() {
        assert_eq!(format_datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_datetime(1_031_699_305_123_456),
            "2002-09-10T23:08:25.123456Z"
        );
        assert_eq!(
            format_datetime(1_709_214_307_000_000),
            "2024-02-29T13:45:07Z"
        );
        assert_eq!(
            parse_datetime("1969-07-21T02:56:15Z"),
            Some(-14_159_025_000_000)
        );
        assert_eq!(
            parse_datetime("1969-07-20T21:56:15-05:00"),
            Some(-14_159_025_000_000)
        );
        assert_eq!(
            parse_datetime("2002-09-10T23:08:25.123456Z"),
            Some(1_031_699_305_123_456)
        );
        assert_eq!(parse_datetime("2002-02-30T00:00:00Z"), None);
        assert_eq!(parse_datetime("yesterday"), None);
    }
}
