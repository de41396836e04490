//! A chart of a load-test run over time, written as SVG with plotters.
//!
//! Only plotters' SVG backend is built in (no `ttf`/`ab_glyph` fonts and no
//! bitmap backend): the SVG backend writes text as `<text>` elements and lets
//! the viewer pick the font, so titles and axis labels need no font files or
//! system libraries.

use std::ops::Range;
use std::path::Path;

use plotters::prelude::*;

/// One point per second of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Seconds since the start of the run.
    pub t_secs: f64,
    /// Open connections at that time.
    pub connections: u64,
    /// Operations per second in that second, e.g. connects/s or deliveries/s.
    pub rate: f64,
    /// Latency p99 over that second, in ms; NaN or 0 when there was no sample.
    pub p99_ms: f64,
}

/// Chart size in pixels.
const SIZE: (u32, u32) = (1200, 800);

const CONNECTIONS_COLOR: RGBColor = RGBColor(31, 119, 180);
const RATE_COLOR: RGBColor = RGBColor(255, 127, 14);
const P99_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Writes a chart to `path` (SVG): two stacked panels sharing the time axis:
/// top, connections (left axis) and rate (right axis, labelled
/// `rate_label`); bottom, p99 latency in ms. Title = `title`.
///
/// Empty `points` still give a valid SVG with the title and empty axes.
/// Non-finite values are skipped, and so is a p99 of 0 or less ("no
/// sample"); lines are broken at skipped values rather than bridged.
/// Any path other than a raster one gets SVG.
///
/// # Errors
///
/// Raster extensions (`.png`, `.jpg`, …) are refused because only the SVG
/// backend is built in; an I/O error writing the file is reported too.
pub fn plot(path: &Path, title: &str, rate_label: &str, points: &[Point]) -> Result<(), String> {
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        let ext = ext.to_ascii_lowercase();
        if matches!(
            ext.as_str(),
            "png" | "jpg" | "jpeg" | "gif" | "bmp" | "webp" | "tif" | "tiff"
        ) {
            return Err(format!(
                "cannot write {}: only SVG output is built in (use a .svg path)",
                path.display()
            ));
        }
    }
    draw(path, title, rate_label, points)
        .map_err(|e| format!("cannot write chart {}: {e}", path.display()))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, title: &str, rate_label: &str, points: &[Point]) -> DrawResult {
    let points: Vec<Point> = points
        .iter()
        .copied()
        .filter(|p| p.t_secs.is_finite())
        .collect();
    let x_range = padded_range(points.iter().map(|p| p.t_secs), false);
    let conn_range = padded_range(points.iter().map(|p| p.connections as f64), true);
    let rate_range = padded_range(points.iter().map(|p| p.rate), true);
    let p99_range = padded_range(points.iter().filter_map(p99), true);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root.titled(title, ("sans-serif", 28))?;
    let (top, bottom) = body.split_vertically(SIZE.1 * 58 / 100);

    // Top panel: connections on the left axis, rate on the right.
    let mut chart = ChartBuilder::on(&top)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), conn_range)?
        .set_secondary_coord(x_range.clone(), rate_range);
    chart
        .configure_mesh()
        .x_labels(12)
        .y_labels(8)
        .x_label_formatter(&|x| secs(*x))
        .y_label_formatter(&|y| si(*y))
        .x_label_style(("sans-serif", 13))
        .y_label_style(text(13, CONNECTIONS_COLOR))
        .y_desc("connections")
        .axis_desc_style(text(16, CONNECTIONS_COLOR))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_labels(8)
        .y_label_formatter(&|y| si(*y))
        .label_style(text(13, RATE_COLOR))
        .y_desc(rate_label)
        .axis_desc_style(text(16, RATE_COLOR))
        .draw()?;
    // The series are told apart by colour: each matches its axis title and
    // tick labels (a legend box would sit on top of the data).
    for run in runs(&points, |p| Some(p.connections as f64)) {
        chart.draw_series(line(run, CONNECTIONS_COLOR))?;
    }
    for run in runs(&points, |p| Some(p.rate)) {
        chart.draw_secondary_series(line(run, RATE_COLOR))?;
    }

    // Bottom panel: p99 latency on the same time axis.
    let mut chart = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(x_range, p99_range)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .y_labels(6)
        .x_label_formatter(&|x| secs(*x))
        .y_label_formatter(&|y| si(*y))
        .x_label_style(("sans-serif", 13))
        .y_label_style(text(13, P99_COLOR))
        .x_desc("time (s)")
        .y_desc("p99 latency (ms)")
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for run in runs(&points, p99) {
        chart.draw_series(line(run, P99_COLOR))?;
    }

    root.present()?;
    Ok(())
}

/// The p99 of a point, if it is a real sample.
fn p99(p: &Point) -> Option<f64> {
    (p.p99_ms.is_finite() && p.p99_ms > 0.0).then_some(p.p99_ms)
}

/// A line through `run`, with a dot on each point when the run is a single
/// point (a lone point would otherwise be invisible).
fn line<DB: DrawingBackend>(run: Vec<(f64, f64)>, color: RGBColor) -> LineSeries<DB, (f64, f64)> {
    let dots = if run.len() == 1 { 3 } else { 0 };
    LineSeries::new(run, color.stroke_width(2)).point_size(dots)
}

/// A sans-serif text style of `size` px in `color`.
fn text(size: u32, color: RGBColor) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(&color)
}

/// Splits the points into runs of consecutive points where `value` gives a
/// finite number, as (time, value) pairs.
fn runs(points: &[Point], value: impl Fn(&Point) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for p in points {
        match value(p).filter(|v| v.is_finite()) {
            Some(v) => current.push((p.t_secs, v)),
            None if current.is_empty() => {}
            None => out.push(std::mem::take(&mut current)),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// An axis range covering the finite `values`: from 0 (when `from_zero` and
/// no value is negative) or the minimum, to the maximum plus 5 % headroom.
/// Never empty: `0..1` with no values, `v..v+1` with a single value.
fn padded_range(values: impl Iterator<Item = f64>, from_zero: bool) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return 0.0..1.0;
    }
    if from_zero {
        lo = lo.min(0.0);
        hi += (hi - lo) * 0.05;
    }
    if hi - lo < f64::EPSILON * hi.abs().max(1.0) {
        hi = lo + 1.0;
    }
    lo..hi
}

/// Formats a time-axis value: like [`si`] below 1000 s, whole seconds above
/// (`3600` reads better than `3.6k` for a duration).
fn secs(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        si(v)
    }
}

/// Formats an axis value compactly: `950`, `1.5k`, `12M`, `0.25`.
fn si(v: f64) -> String {
    if v == 0.0 {
        return "0".to_owned(); // also for -0.0
    }
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if scaled.abs() >= 100.0 || scaled.fract() == 0.0 {
        format!("{scaled:.0}")
    } else if scaled.abs() >= 10.0 {
        format!("{scaled:.1}")
    } else {
        format!("{scaled:.2}")
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("tether-plot-test-{}-{name}", std::process::id()))
    }

    fn synthetic(n: usize) -> Vec<Point> {
        (0..n)
            .map(|i| {
                let t = i as f64;
                Point {
                    t_secs: t,
                    connections: (i as u64 * 1_700).min(80_000),
                    rate: if i < 47 { 1_700.0 } else { 0.0 },
                    p99_ms: 2.0 + (t / 7.0).sin().abs() * 40.0,
                }
            })
            .collect()
    }

    #[test]
    fn plots_a_run() {
        let path = temp_path("run.svg");
        let title = "connect flood: 80k conns <tls> & zlib";
        plot(&path, title, "connects/s", &synthetic(60)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg"));
        // Text is emitted as <text> elements, XML-escaped.
        assert!(
            svg.contains("connect flood: 80k conns &lt;tls&gt; &amp; zlib"),
            "title missing"
        );
        for label in [
            "connections",
            "connects/s",
            "p99 latency (ms)",
            "time (s)",
            "80k",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert!(svg.contains("<polyline"), "no lines drawn");
        assert!(svg.trim_end().ends_with("</svg>"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn plots_no_points() {
        let path = temp_path("empty.svg");
        plot(&path, "empty run", "deliveries/s", &[]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("empty run"));
        assert!(svg.contains("p99 latency (ms)"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn skips_non_finite_values() {
        let mut points = synthetic(30);
        points[3].p99_ms = f64::NAN;
        points[4].p99_ms = 0.0;
        points[5].rate = f64::INFINITY;
        points[6].t_secs = f64::NAN;
        points[7].rate = f64::NAN;
        points[7].p99_ms = f64::NEG_INFINITY;
        points[20].p99_ms = f64::NAN;
        points[22].p99_ms = f64::NAN;
        let path = temp_path("nan.svg");
        plot(&path, "nan run", "deliveries/s", &points).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "non-finite leaked"
        );

        let all_nan: Vec<Point> = (0..10)
            .map(|i| Point {
                t_secs: i as f64,
                connections: 0,
                rate: f64::NAN,
                p99_ms: f64::NAN,
            })
            .collect();
        plot(&path, "all nan", "x/s", &all_nan).unwrap();
        let single = [Point {
            t_secs: f64::NAN,
            ..Point::default()
        }];
        plot(&path, "single nan", "x/s", &single).unwrap();
        plot(&path, "one point", "x/s", &synthetic(1)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<circle"), "lone point should get a dot");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn refuses_png_and_reports_io_errors() {
        let e = plot(Path::new("/tmp/x.PNG"), "t", "r", &synthetic(3)).unwrap_err();
        assert!(e.contains("only SVG"), "{e}");
        let e = plot(
            Path::new("/nonexistent-dir/tether/x.svg"),
            "t",
            "r",
            &synthetic(3),
        )
        .unwrap_err();
        assert!(e.contains("cannot write chart"), "{e}");
    }

    #[test]
    fn splits_runs_and_ranges() {
        let pts = synthetic(6);
        let r = runs(&pts, |p| (p.t_secs as u32 % 3 != 1).then_some(p.t_secs));
        assert_eq!(
            r,
            vec![
                vec![(0.0, 0.0)],
                vec![(2.0, 2.0), (3.0, 3.0)],
                vec![(5.0, 5.0)]
            ]
        );
        assert_eq!(padded_range(std::iter::empty(), true), 0.0..1.0);
        assert_eq!(padded_range([5.0].into_iter(), false), 5.0..6.0);
        assert_eq!(padded_range([0.0, 0.0].into_iter(), true), 0.0..1.0);
        assert_eq!(padded_range([10.0, f64::NAN].into_iter(), true), 0.0..10.5);
        assert_eq!(si(950.0), "950");
        assert_eq!(si(1500.0), "1.5k");
        assert_eq!(si(80_000.0), "80k");
        assert_eq!(si(12_000_000.0), "12M");
        assert_eq!(si(0.25), "0.25");
        assert_eq!(si(12.5), "12.5");
        assert_eq!(si(-0.0), "0");
        assert_eq!(secs(3600.0), "3600");
        assert_eq!(secs(12.5), "12.5");
    }
}
