//! The sweep's SVG chart: object miss ratio and 503 rate against the memory limit.
//!
//! Hand-written rather than `plotters`: a few hundred lines of deterministic SVG, byte-identical
//! across runs and dependency updates (the committed chart in docs/ is diffed), with no drawing
//! stack to build.

use std::fmt::Write as _;

use modelpool::PolicyKind;

use crate::config::PolicyChoice;
use crate::report::{Report, fmt_bytes};
use crate::sweep::Sweep;

impl Sweep {
    /// A two-panel SVG chart: object miss ratio and 503 rate against the memory limit, one
    /// line per policy (offline baselines dashed), the recommended limit marked.
    pub fn to_svg(&self, title: &str) -> String {
        const W: f64 = 1400.0;
        const H: f64 = 440.0;
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            xml_escape(title)
        );
        type Metric = fn(&Report) -> f64;
        let panels: [(&str, Metric, Option<f64>); 3] = [
            ("object miss ratio", |r| r.miss_ratio.object, None),
            ("503 rate (share of requests)", |r| r.rate_503, Some(self.target.max_503_rate)),
            ("p99 added latency (s)", |r| r.added_latency.p99, Some(self.target.max_p99_secs)),
        ];
        let (lo, hi) =
            (*self.limits.first().unwrap_or(&0) as f64 / 1e9, *self.limits.last().unwrap_or(&1) as f64 / 1e9);
        let hi = if hi > lo { hi } else { lo + 1.0 };
        for (pi, (label, metric, target)) in panels.iter().enumerate() {
            let (x0, y0, pw, ph) = (70.0 + pi as f64 * 460.0, 50.0, 380.0, 300.0);
            let ymax = self.cells.iter().map(|c| metric(&c.report)).fold(target.unwrap_or(0.0), f64::max);
            let ymax = nice_ceil(ymax.max(1e-6));
            let px = |gb: f64| x0 + (gb - lo) / (hi - lo) * pw;
            let py = |v: f64| y0 + ph - v / ymax * ph;
            let _ = writeln!(
                o,
                r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
            );
            for i in 0..=5 {
                let v = ymax * i as f64 / 5.0;
                let y = py(v);
                let _ = writeln!(
                    o,
                    r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                    x0 + pw,
                    x0 - 6.0,
                    y + 4.0,
                    fmt_tick(v)
                );
            }
            for i in 0..=5 {
                let gb = lo + (hi - lo) * i as f64 / 5.0;
                let x = px(gb);
                let _ = writeln!(
                    o,
                    r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{gb:.1}</text>"##,
                    y0 + ph,
                    y0 + ph + 5.0,
                    y0 + ph + 18.0
                );
            }
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">memory limit (GB)</text>"#,
                x0 + pw / 2.0,
                y0 + ph + 36.0
            );
            let _ = writeln!(o, r#"<text x="{x0}" y="{:.1}">{label}</text>"#, y0 - 8.0);
            if let Some(t) = target {
                let y = py(*t);
                let _ = writeln!(
                    o,
                    r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#c00" stroke-dasharray="2,3"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c00">target</text>"##,
                    x0 + pw,
                    x0 + pw - 4.0,
                    y - 4.0
                );
            }
            if let Some((l, _)) = self.recommended {
                let x = px(l as f64 / 1e9);
                let (tx, anchor) = if x > x0 + pw / 2.0 { (x - 4.0, "end") } else { (x + 4.0, "start") };
                let _ = writeln!(
                    o,
                    r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#2a2" stroke-dasharray="6,4"/><text x="{tx:.1}" y="{:.1}" text-anchor="{anchor}" fill="#2a2">recommended {}</text>"##,
                    y0 + ph,
                    y0 + 14.0,
                    fmt_bytes(l)
                );
            }
            for &p in &self.policies {
                let pts: Vec<String> = self
                    .cells
                    .iter()
                    .filter(|c| c.policy == p)
                    .map(|c| format!("{:.1},{:.1}", px(c.limit as f64 / 1e9), py(metric(&c.report))))
                    .collect();
                let dash = if p.is_offline() { r#" stroke-dasharray="5,4""# } else { "" };
                let _ = writeln!(
                    o,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                    pts.join(" "),
                    color(p)
                );
                for pt in &pts {
                    let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{}"/>"#, color(p));
                }
            }
        }
        for (i, &p) in self.policies.iter().enumerate() {
            let x = 70.0 + i as f64 * 150.0;
            let y = H - 20.0;
            let dash = if p.is_offline() { r#" stroke-dasharray="5,4""# } else { "" };
            let _ = writeln!(
                o,
                r#"<line x1="{x}" y1="{y}" x2="{:.1}" y2="{y}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}{}</text>"#,
                x + 28.0,
                color(p),
                x + 34.0,
                y + 4.0,
                p.as_str(),
                if p.is_offline() { " (offline)" } else { "" }
            );
        }
        o.push_str("</svg>\n");
        o
    }
}

fn color(p: PolicyChoice) -> &'static str {
    match p {
        PolicyChoice::Online(PolicyKind::Lru) => "#1f77b4",
        PolicyChoice::Online(PolicyKind::Gdsf) => "#ff7f0e",
        PolicyChoice::Online(PolicyKind::Lfu) => "#2ca02c",
        PolicyChoice::Online(PolicyKind::Predictive) => "#9467bd",
        PolicyChoice::Belady => "#7f7f7f",
        PolicyChoice::BeladyCost => "#222222",
    }
}

/// 1, 2, 2.5 or 5 times a power of ten, at least `x`.
fn nice_ceil(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= x * (1.0 - 1e-12) {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceil_rounds_up() {
        assert_eq!(nice_ceil(0.37), 0.5);
        assert_eq!(nice_ceil(0.001), 0.001);
        assert_eq!(nice_ceil(3.0), 5.0);
    }
}
