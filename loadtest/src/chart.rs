//! The SVG chart of a run: each tenant's share of admissions per window (top), and Jain's index
//! per window (bottom), drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;

/// Tenants drawn as their own line; the rest are summed into one grey "others" line, since a
/// hundred coloured lines say nothing.
const MAX_LINES: usize = 10;

pub fn write_svg(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(500);
    let end = report.windows.last().map(|w| w.start_s + report.fairness.window_seconds).unwrap_or(1.0);
    let start = report.windows.first().map(|w| w.start_s).unwrap_or(0.0);

    let mut busiest: Vec<_> = report.tenants.iter().collect();
    busiest.sort_by(|a, b| b.admitted.cmp(&a.admitted).then(a.tenant.cmp(&b.tenant)));
    let drawn: Vec<&str> = busiest.iter().take(MAX_LINES).map(|t| t.tenant.as_str()).collect();
    let share = |w: &crate::report::Window, tenant: Option<&str>| {
        let total: usize = w.admitted.values().sum();
        let n: usize = match tenant {
            Some(t) => w.admitted.get(t).copied().unwrap_or(0),
            None => w.admitted.iter().filter(|(t, _)| !drawn.contains(&t.as_str())).map(|(_, n)| n).sum(),
        };
        if total == 0 {
            0.0
        } else {
            n as f64 / total as f64
        }
    };
    let top_share = report
        .windows
        .iter()
        .flat_map(|w| drawn.iter().map(move |t| (w, Some(*t))).chain([(w, None)]))
        .map(|(w, t)| share(w, t))
        .fold(0.0f64, f64::max)
        .max(0.05);

    let mut chart = ChartBuilder::on(&top)
        .caption("Share of admissions per window, by tenant", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(start..end, 0.0..top_share * 1.1)?;
    chart.configure_mesh().x_desc("seconds").y_desc("share").draw()?;
    for (i, tenant) in drawn.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let fair = report.tenants.iter().find(|t| t.tenant == *tenant).map(|t| t.fair_share).unwrap_or(0.0);
        chart
            .draw_series(LineSeries::new(
                report.windows.iter().map(|w| (w.start_s, share(w, Some(tenant)))),
                colour.stroke_width(2),
            ))?
            .label(format!("{tenant} (fair {:.1}%)", fair * 100.0))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    if busiest.len() > drawn.len() {
        let grey = RGBColor(150, 150, 150);
        chart
            .draw_series(LineSeries::new(
                report.windows.iter().map(|w| (w.start_s, share(w, None))),
                grey.stroke_width(2),
            ))?
            .label(format!("{} other tenants together", busiest.len() - drawn.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], grey.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;

    let mut jain = ChartBuilder::on(&bottom)
        .caption("Jain's index per window (backlogged tenants, weight-normalised)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(start..end, 0.0..1.05)?;
    jain.configure_mesh().x_desc("seconds").y_desc("Jain").draw()?;
    jain.draw_series(LineSeries::new([(start, 0.98), (end, 0.98)], RED.mix(0.6)))?
        .label("0.98 target")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.mix(0.6)));
    jain.draw_series(LineSeries::new(
        report.windows.iter().filter_map(|w| w.jain.map(|j| (w.start_s, j))),
        BLUE.stroke_width(2),
    ))?
    .label("Jain's index")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    jain.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{build, Sample};

    #[test]
    fn the_chart_names_every_drawn_tenant_and_the_others() {
        let tenants: Vec<(String, u32)> = (0..12).map(|i| (format!("tenant-{i}"), 1 + i as u32 % 3)).collect();
        let samples: Vec<Sample> = (0..1200)
            .map(|k| Sample {
                tenant: k % 12,
                published_s: 0.0,
                latency_ms: 1.0,
                phase: "Succeeded".into(),
                admitted_s: Some(k as f64 / 300.0),
                admission_wait_ms: Some(1.0),
                unexpected: false,
            })
            .collect();
        let report = build(&samples, &tenants, 4.0, 1.0);
        let dir = std::env::temp_dir().join(format!("agenttask-loadtest-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shares.svg");
        write_svg(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("2 other tenants together"));
        assert!(svg.contains("Jain&apos;s index") || svg.contains("Jain's index"));
        assert_eq!(svg.matches("(fair ").count(), 10);
    }
}
