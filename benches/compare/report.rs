//! Figures, and the Markdown tables they are printed in.

use std::time::Duration;

use crate::pair::Pair;

/// One measured value.
#[derive(Clone, Debug)]
pub enum Val {
    Time(Duration),
    Bytes(u64),
}

impl Val {
    fn number(&self) -> f64 {
        match self {
            Val::Time(d) => d.as_secs_f64(),
            Val::Bytes(b) => *b as f64,
        }
    }
}

impl std::fmt::Display for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Val::Time(d) => f.write_str(&dur(*d)),
            Val::Bytes(b) => write!(f, "{:.1} MiB", *b as f64 / (1024.0 * 1024.0)),
        }
    }
}

/// A duration with a unit that suits it.
pub fn dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// One line of the comparison table: lower is better for every value in it.
pub struct Row {
    pub workload: String,
    pub value: Pair<Val>,
    /// The ratio lamina/overlay the issue asks for, if any.
    pub target: Option<f64>,
    /// For a target "within noise": the highest ratio overlay's own runs reached against their
    /// median (its slowest run ÷ its median). A ratio up to that is as close as the
    /// measurement can tell.
    pub noise: Option<f64>,
}

impl Row {
    pub fn new(workload: impl Into<String>, value: Pair<Val>, target: Option<f64>) -> Row {
        Row {
            workload: workload.into(),
            value,
            target,
            noise: None,
        }
    }

    /// A row whose target allows for the run-to-run spread of overlay's own samples.
    pub fn within_noise(mut self, overlay_samples: &[Duration]) -> Row {
        let median = median(overlay_samples).as_secs_f64();
        let slowest = overlay_samples
            .iter()
            .max()
            .map_or(0.0, |d| d.as_secs_f64());
        if median > 0.0 {
            self.noise = Some(slowest / median);
        }
        self
    }

    pub fn ratio(&self) -> f64 {
        self.value.lamina.number() / self.value.overlay.number()
    }
}

pub fn comparison_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | lamina | overlay | lamina/overlay | target | met |\n|---|---:|---:|---:|---:|:---:|\n",
    );
    for r in rows {
        let ratio = r.ratio();
        let (target, met) = match (r.target, r.noise) {
            (Some(t), Some(noise)) => {
                let allowed = t.max(noise);
                (
                    format!("≤ {t:.2} within noise (≤ {allowed:.2})"),
                    if ratio <= allowed { "yes" } else { "**no**" },
                )
            }
            (Some(t), None) => (
                format!("≤ {t:.2}"),
                if ratio <= t { "yes" } else { "**no**" },
            ),
            (None, _) => ("—".into(), ""),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.workload,
            r.value.lamina,
            r.value.overlay,
            ratio_text(ratio, r.target),
            target,
            met
        ));
    }
    out
}

/// The ratio with two decimals, or three when two would round it onto the target.
fn ratio_text(ratio: f64, target: Option<f64>) -> String {
    let two = format!("{ratio:.2}");
    match target {
        Some(t) if two == format!("{t:.2}") && ratio != t => format!("{ratio:.3}"),
        _ => two,
    }
}

/// A target lamina is held to on its own (not against overlay).
pub struct Check {
    pub what: String,
    pub value: Pair<String>,
    pub target: String,
    pub met: Option<bool>,
}

pub fn checks_table(checks: &[Check]) -> String {
    let mut out = String::from(
        "| target | lamina | overlay (for reference) | wanted | met |\n|---|---:|---:|---:|:---:|\n",
    );
    for c in checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "?",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            c.what, c.value.lamina, c.value.overlay, c.target, met
        ));
    }
    out
}

/// The `q`-quantile (0..=1) of `xs` (nearest rank).
pub fn quantile(xs: &[Duration], q: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let mut v = xs.to_vec();
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn median(xs: &[Duration]) -> Duration {
    quantile(xs, 0.5)
}

pub fn mean(xs: &[Duration]) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.iter().sum::<Duration>() / xs.len() as u32
}

/// Samples as "median (min – max)".
pub fn spread(xs: &[Duration]) -> String {
    let (min, max) = (
        xs.iter().min().copied().unwrap_or_default(),
        xs.iter().max().copied().unwrap_or_default(),
    );
    format!("{} ({} – {})", dur(median(xs)), dur(min), dur(max))
}

/// One workload of lamina against itself, with a boolean setting on and off.
pub struct OnOff {
    pub workload: String,
    pub on: Vec<Duration>,
    pub off: Vec<Duration>,
}

/// The table of [`OnOff`] rows for `setting`: each side's median and range, and the ratio of
/// the medians.
pub fn on_off_table(setting: &str, rows: &[OnOff]) -> String {
    let mut out = format!(
        "| workload | {setting} = true: median (min – max) | {setting} = false: median (min – max) | true ÷ false (medians) |\n|---|---:|---:|---:|\n"
    );
    for r in rows {
        let ratio = median(&r.on).as_secs_f64() / median(&r.off).as_secs_f64();
        out.push_str(&format!(
            "| {} | {} | {} | {ratio:.2} |\n",
            r.workload,
            spread(&r.on),
            spread(&r.off)
        ));
    }
    out
}
