//! Line charts as SVG (log-scaled axes), written by hand: no plotting stack to install.
use std::fmt::Write as _;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Enough for every series of one chart (the per-packet one has 11).
const COLORS: [&str; 14] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2",
    "#7f7f7f", "#bcbd22", "#000000", "#aec7e8", "#98df8a", "#ff9896",
];

/// Decades covering `values` (positive, finite ones; 1..10 if there are none, e.g. when a
/// part of the bench was not run).
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf(lo.max(1e-9).log10().floor());
    let hi = 10f64.powf(hi.max(lo * 10.0).log10().ceil());
    (lo, hi)
}

/// A chart of `series` with log x and log y axes.
pub fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h, left, right, top, bottom) = (860.0, 440.0, 80.0, 300.0, 40.0, 60.0);
    let all = || series.iter().flat_map(|s| s.points.iter().copied());
    let (x0, x1) = log_range(all().map(|p| p.0));
    let (y0, y1) = log_range(all().map(|p| p.1));
    let px =
        |x: f64| left + (x.log10() - x0.log10()) / (x1.log10() - x0.log10()) * (w - left - right);
    let py = |y: f64| {
        h - bottom - (y.log10() - y0.log10()) / (y1.log10() - y0.log10()) * (h - top - bottom)
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{title}</text>\n",
        (w - right + left) / 2.0
    );
    let mut decade = x0;
    while decade <= x1 * 1.0001 {
        let x = px(decade);
        let _ = writeln!(
            svg,
            "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{decade}</text>",
            h - bottom,
            h - bottom + 18.0
        );
        decade *= 10.0;
    }
    let mut decade = y0;
    while decade <= y1 * 1.0001 {
        let y = py(decade);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{decade}</text>",
            w - right,
            left - 6.0,
            y + 4.0
        );
        decade *= 10.0;
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">{y_label}</text>",
        (w - right + left) / 2.0,
        h - 16.0,
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        for (x, y) in &s.points {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                px(*x),
                py(*y)
            );
        }
        let ly = top + 18.0 * i as f64 + 10.0;
        let lx = w - right + 12.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>",
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            s.name
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_of_no_points_or_one_point_are_drawn() {
        let empty = chart("t", "x", "y", &[]);
        assert!(empty.ends_with("</svg>\n"));
        let one = Series {
            name: "only".into(),
            points: vec![(1.0, 500.0)],
        };
        let svg = chart("t", "x", "y", &[one]);
        assert!(svg.contains("<circle"), "{svg}");
        // x: 1..10, y: 100..1000, one grid line per decade.
        assert_eq!(svg.matches("stroke=\"#ddd\"").count(), 4, "{svg}");
    }
}
