//! The sweep plot: accuracy against the swept parameter with 95% interval bars, and the
//! baseline as a line with its interval as a band. Plain SVG, viewable in any browser.

use super::stats::Interval;
use std::fmt::Write;

pub struct SweepPoint {
    pub value: f64,
    pub accuracy: f64,
    pub ci: Interval,
}

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// An SVG document; `baseline` is the no-intervention accuracy and interval.
pub fn sweep_svg(
    title: &str,
    parameter: &str,
    points: &[SweepPoint],
    baseline: (f64, Interval),
) -> String {
    let (x_min, x_max) = span(points.iter().map(|p| p.value));
    let (y_min, y_max) = {
        let lows = points.iter().map(|p| p.ci.low).chain([baseline.1.low]);
        let highs = points.iter().map(|p| p.ci.high).chain([baseline.1.high]);
        let lo = lows.fold(1.0, f64::min);
        let hi = highs.fold(0.0, f64::max);
        (
            (((lo - 0.05) * 10.0).floor() / 10.0).max(0.0),
            (((hi + 0.05) * 10.0).ceil() / 10.0).min(1.0),
        )
    };
    let x = |v: f64| LEFT + (v - x_min) / (x_max - x_min) * (W - LEFT - RIGHT);
    let y = |a: f64| TOP + (y_max - a) / (y_max - y_min).max(1e-9) * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Baseline band and line.
    let (base, base_ci) = baseline;
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#999" fill-opacity="0.2"/>"##,
        y(base_ci.high),
        W - LEFT - RIGHT,
        (y(base_ci.low) - y(base_ci.high)).max(0.0)
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#666" stroke-dasharray="6 4"/>"##,
        W - RIGHT,
        y(base),
        y(base)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">no intervention {:.1}%</text>"##,
        W - RIGHT - 4.0,
        y(base) - 6.0,
        base * 100.0
    );
    // Axes, ticks and labels.
    let (bottom, right) = (H - BOTTOM, W - RIGHT);
    let _ = writeln!(
        svg,
        r#"<path d="M{LEFT},{TOP} V{bottom} H{right}" fill="none" stroke="black"/>"#
    );
    let steps = ((y_max - y_min) / 0.1).round().max(1.0) as usize;
    for i in 0..=steps {
        let a = y_min + (y_max - y_min) * i as f64 / steps as f64;
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" x2="{LEFT}" y1="{:.1}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text><line x1="{LEFT}" x2="{right}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            LEFT - 5.0,
            y(a),
            y(a),
            LEFT - 8.0,
            y(a) + 4.0,
            a * 100.0,
            y(a),
            y(a)
        );
    }
    for p in points {
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{bottom}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(p.value),
            x(p.value),
            bottom + 5.0,
            x(p.value),
            bottom + 20.0,
            p.value
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (LEFT + right) / 2.0,
        H - 15.0,
        escape(parameter)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">accuracy (95% CI)</text>"#,
        (TOP + bottom) / 2.0
    );
    // The sweep: a line through the points, interval bars, dots.
    let path: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.value), y(p.accuracy)))
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
        path.join(" ")
    );
    for p in points {
        let (px, lo, hi) = (x(p.value), y(p.ci.low), y(p.ci.high));
        let _ = writeln!(
            svg,
            r##"<path d="M{:.1},{lo:.1} H{:.1} M{px:.1},{lo:.1} V{hi:.1} M{:.1},{hi:.1} H{:.1}" stroke="#1f77b4"/><circle cx="{px:.1}" cy="{:.1}" r="4" fill="#1f77b4"/>"##,
            px - 5.0,
            px + 5.0,
            px - 5.0,
            px + 5.0,
            y(p.accuracy)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The range of `values`, widened a little so the end points are not on the frame.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = ((hi - lo) * 0.05).max(0.1);
    (lo - pad, hi + pad)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
