//! Figures as people read them: durations, job ages, sizes, and aligned text tables. One
//! place for them, so that `jobhost ctl status`, the status page and `jobhost top` show the
//! same value the same way (the page's script, `http/page.js`, refreshes with its own copy of
//! [`duration`], [`job_age`] and [`size`]: change them together).
//!
//! Pure text: it never cleans what it is given. A table's cells must already be safe to show
//! (the admin reply escapes them with [`crate::admin::one_line`], top replaces them with `?`);
//! widths are measured as a terminal shows them ([`console::measure_text_width`]: a wide
//! character takes two columns).

/// A duration for people, two units at most: `45s`, `5m02s`, `1h02m`, `3d04h`. Negative or
/// NaN counts as zero.
pub fn duration(secs: f64) -> String {
    // `as` saturates, and turns NaN into 0.
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// A running job's age: tenths of a second under a minute (`1.2s`), then like [`duration`].
pub fn job_age(secs: f64) -> String {
    let secs = if secs.is_nan() { 0.0 } else { secs.max(0.0) };
    if secs < 59.95 {
        format!("{secs:.1}s")
    } else {
        // 59.95 to 60 would show as `60.0s` in tenths, and as `59s` truncated.
        duration(secs.max(60.0))
    }
}

/// A size in bytes, in powers of 1024 like `ps`: `512B`, `4.0K`, `12.3M`, `1.5G`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Round as `{:.1}` will, so 1023.96K becomes 1.0M rather than 1024.0K.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table as lines, the header first: each column as wide as its widest cell, two spaces
/// between columns (one when two would make a line wider than `room` columns), no trailing
/// spaces. A row shorter than the header leaves its last columns empty; cells beyond the
/// header's are not shown.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>], room: usize) -> Vec<String> {
    let header: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    let lines: Vec<Vec<&str>> = std::iter::once(header)
        .chain(
            rows.iter()
                .map(|row| row.iter().map(String::as_str).collect()),
        )
        .collect();
    let mut widths = vec![0; columns.len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(console::measure_text_width(cell));
        }
    }
    let total: usize = widths.iter().sum();
    let gap = if total.saturating_add(2 * widths.len().saturating_sub(1)) <= room {
        "  "
    } else {
        " "
    };
    lines
        .iter()
        .map(|line| {
            let mut text = String::new();
            for (i, ((cell, width), (_, align))) in
                line.iter().zip(&widths).zip(columns).enumerate()
            {
                if i > 0 {
                    text.push_str(gap);
                }
                let pad = width.saturating_sub(console::measure_text_width(cell));
                match align {
                    Align::Left => {
                        text.push_str(cell);
                        text.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        text.extend(std::iter::repeat_n(' ', pad));
                        text.push_str(cell);
                    }
                }
            }
            text.truncate(text.trim_end().len());
            text
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_ages_and_sizes() {
        assert_eq!(duration(0.0), "0s");
        assert_eq!(duration(-5.0), "0s");
        assert_eq!(duration(f64::NAN), "0s");
        assert_eq!(duration(59.99), "59s");
        assert_eq!(duration(60.0), "1m00s");
        assert_eq!(duration(302.0), "5m02s");
        assert_eq!(duration(3599.0), "59m59s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(duration(86399.0), "23h59m");
        assert_eq!(duration(90000.0), "1d01h");
        assert_eq!(duration(2.0 * 86400.0 + 3.0 * 3600.0), "2d03h");
        assert_eq!(duration(f64::INFINITY), duration(u64::MAX as f64));

        assert_eq!(job_age(0.0), "0.0s");
        assert_eq!(job_age(-1.0), "0.0s");
        assert_eq!(job_age(1.23), "1.2s");
        assert_eq!(job_age(59.9), "59.9s");
        assert_eq!(job_age(59.97), "1m00s");
        assert_eq!(job_age(125.0), "2m05s");
        assert_eq!(job_age(f64::NAN), "0.0s");

        assert_eq!(size(0), "0B");
        assert_eq!(size(1023), "1023B");
        assert_eq!(size(1024), "1.0K");
        assert_eq!(size(1_048_524), "1023.9K");
        assert_eq!(size(1_048_525), "1.0M");
        assert_eq!(size(12_900_000), "12.3M");
        assert_eq!(size(1024 * 1024 - 1), "1.0M");
        assert_eq!(size(3 << 30), "3.0G");
        assert_eq!(size(u64::MAX), "16384.0P");
    }

    #[test]
    fn a_table_aligns_by_what_a_terminal_shows() {
        use Align::{Left, Right};
        let columns = [("NAME", Left), ("N", Right), ("NOTE", Left)];
        let rows = vec![
            vec!["日本".to_owned(), "7".to_owned(), String::new()],
            vec!["a".to_owned(), "1234".to_owned(), "x".to_owned()],
            vec!["short".to_owned()],
        ];
        assert_eq!(
            table(&columns, &rows, usize::MAX),
            [
                "NAME      N  NOTE",
                "日本      7",
                "a      1234  x",
                "short",
            ]
        );
        // Too wide for two spaces between columns: one.
        assert_eq!(table(&columns, &rows, 14)[2], "a     1234 x");
        assert_eq!(table(&columns, &[], 0), ["NAME N NOTE"]);
    }
}
