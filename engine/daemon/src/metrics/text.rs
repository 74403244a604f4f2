//! Prometheus' text exposition format (version 0.0.4), written by hand: histograms with
//! fixed buckets, and a writer that gives each family its `# HELP` and `# TYPE` once and
//! escapes label values as the format asks.

use std::fmt::Write as _;

/// The media type a scrape is answered with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A histogram of durations in seconds over fixed upper bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed when written).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`, which must be increasing.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// How many observations it holds.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of its observations.
    #[cfg(test)]
    pub fn sum_seconds(&self) -> f64 {
        self.sum
    }
}

/// The label pairs of one sample, in order.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Builds one exposition.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A metric family's kind, as `# TYPE` names it.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    /// Starts a family: its help text and type. Every sample of the family follows before
    /// the next family starts, as the format requires.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// The samples of one histogram: its cumulative buckets, sum and count.
    pub fn histogram(&mut self, name: &str, labels: Labels<'_>, h: &Histogram) {
        let mut cumulative = 0;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&number(*bound)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.count);
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(h.sum));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", h.count);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: Labels<'_>, le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

/// A value as the format writes it: integers without a fraction, others in full.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_written_cumulatively_with_escaped_labels() {
        static BOUNDS: [f64; 3] = [0.1, 1.0, 10.0];
        let mut h = Histogram::new(&BOUNDS);
        for s in [0.05, 0.5, 0.7, 20.0] {
            h.observe(s);
        }
        let mut e = Exposition::default();
        e.family("x_seconds", Kind::Histogram, "How long.");
        e.histogram("x_seconds", &[("tier", "a\"b\\c\nd")], &h);
        let text = e.finish();
        let want = "# HELP x_seconds How long.\n# TYPE x_seconds histogram\n\
            x_seconds_bucket{tier=\"a\\\"b\\\\c\\nd\",le=\"0.1\"} 1\n\
            x_seconds_bucket{tier=\"a\\\"b\\\\c\\nd\",le=\"1\"} 3\n\
            x_seconds_bucket{tier=\"a\\\"b\\\\c\\nd\",le=\"10\"} 3\n\
            x_seconds_bucket{tier=\"a\\\"b\\\\c\\nd\",le=\"+Inf\"} 4\n\
            x_seconds_sum{tier=\"a\\\"b\\\\c\\nd\"} 21.25\n\
            x_seconds_count{tier=\"a\\\"b\\\\c\\nd\"} 4\n";
        assert_eq!(text, want);
    }

    #[test]
    fn numbers_are_written_as_the_format_reads_them() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
