//! The report's charts as SVG, drawn here without a plotting dependency: a line chart
//! (connection rate against the number of services) and a horizontal bar chart (per-packet
//! cost per program).

use std::fmt::Write as _;

const PALETTE: [&str; 8] = [
    "#1b6ca8", "#d1495b", "#2a9d8f", "#e9a03b", "#6d597a", "#8ab17d", "#264653", "#b56576",
];
const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum and tick step for values up to `max`.
fn axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| step * 5.0 >= max)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

/// A bar's value as written beside it: whole numbers from 100, else two digits that count.
fn bar_label(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn number(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// The SVG element, a white background and the title at `title_x`.
fn open(width: f64, height: f64, title_x: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" {FONT} font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{title_x}\" y=\"28\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    )
}

/// One line per series over categorical x values (equally spaced).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    let (width, height) = (900.0, 440.0);
    let (left, right, top, bottom) = (80.0, 340.0, 50.0, 60.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let max = series
        .iter()
        .flat_map(|(_, values)| values.iter().copied())
        .fold(0.0, f64::max);
    let (y_max, step) = axis(max);
    let x = |i: usize| left + plot_w * (i as f64 + 0.5) / categories.len() as f64;
    let y = |v: f64| top + plot_h * (1.0 - v / y_max);
    let mut svg = open(width, height, left, title);
    let mut tick = 0.0;
    while tick <= y_max + step / 2.0 {
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 8.0,
            y(tick) + 4.0,
            number(tick),
            y = y(tick)
        );
        tick += step;
    }
    for (i, category) in categories.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(i),
            top + plot_h + 20.0,
            escape(category)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        left + plot_w / 2.0,
        height - 15.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        "<text transform=\"translate(20 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        top + plot_h / 2.0,
        escape(y_label)
    );
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#888\"/>"
    );
    for (k, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\"/>",
            points.join(" ")
        );
        for (i, v) in values.iter().enumerate() {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"><title>{}: {}</title></circle>",
                x(i),
                y(*v),
                escape(name),
                number(*v)
            );
        }
        let legend_y = top + 10.0 + 22.0 * k as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{legend_y}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>",
            left + plot_w + 15.0,
            left + plot_w + 40.0,
            left + plot_w + 46.0,
            legend_y + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One horizontal bar per row, grouped; `baseline` rows are drawn grey.
pub struct Bar {
    pub group: String,
    pub label: String,
    pub value: f64,
    pub baseline: bool,
}

pub fn bar_chart(title: &str, unit: &str, bars: &[Bar]) -> String {
    let row_h = 22.0;
    let group_gap = 16.0;
    let (left, right, top) = (400.0, 90.0, 50.0);
    let width = 980.0;
    let plot_w = width - left - right;
    let groups = {
        let mut seen: Vec<&str> = Vec::new();
        for bar in bars {
            if !seen.contains(&bar.group.as_str()) {
                seen.push(&bar.group);
            }
        }
        seen
    };
    let height = top + bars.len() as f64 * row_h + groups.len() as f64 * (group_gap + row_h) + 40.0;
    let max = bars.iter().map(|b| b.value).fold(0.0, f64::max);
    let (x_max, step) = axis(max);
    let scale = |v: f64| plot_w * v / x_max;
    let mut svg = open(width, height, 20.0, title);
    let plot_bottom = height - 40.0;
    let mut tick = 0.0;
    while tick <= x_max + step / 2.0 {
        let x = left + scale(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{plot_bottom}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            plot_bottom + 16.0,
            number(tick)
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        left + plot_w / 2.0,
        height - 6.0,
        escape(unit)
    );
    let mut y = top;
    for (g, group) in groups.iter().enumerate() {
        y += if g == 0 { 0.0 } else { group_gap };
        let _ = writeln!(
            svg,
            "<text x=\"20\" y=\"{:.1}\" font-weight=\"bold\">{}</text>",
            y + 15.0,
            escape(group)
        );
        y += row_h;
        let color = PALETTE[g % PALETTE.len()];
        for bar in bars.iter().filter(|b| b.group == *group) {
            let fill = if bar.baseline { "#9e9e9e" } else { color };
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                left - 8.0,
                y + 15.0,
                escape(&bar.label),
                y + 3.0,
                scale(bar.value).max(1.0),
                row_h - 6.0,
                left + scale(bar.value) + 6.0,
                y + 15.0,
                bar_label(bar.value)
            );
            y += row_h;
        }
    }
    svg.push_str("</svg>\n");
    svg
}
