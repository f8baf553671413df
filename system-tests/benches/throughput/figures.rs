//! The figures of a run, each with its ratio to the C1 of the same run and the target
//! beside it, and the medians over several runs.
//!
//! A rate's ratio is `rate / C1`. A time's is `time × C1`: how many durable one-row commits
//! PostgreSQL made in that time on the same machine in the same run ("C1 commits"), which is
//! what makes latencies comparable across runs on a noisy shared machine.

use std::collections::BTreeMap;

/// What a figure's value means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    PerSecond,
    Millis,
    Seconds,
    /// Millions of bytes (memory).
    Megabytes,
    Count,
    /// 1 for yes, 0 for no.
    Flag,
}

/// The target for a figure.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// At least this fraction of C1.
    AtLeastTimesC1(f64),
    /// At least this fraction of another figure of the same run, named by key.
    AtLeastTimes(&'static str, f64),
    /// A count that must be zero.
    Zero,
    /// A flag that must be no.
    No,
    /// A flag that must be yes.
    Yes,
}

#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable name, the same in every run (used by [`Target::AtLeastTimes`] and the medians).
    pub key: &'static str,
    pub value: f64,
    pub unit: Unit,
    pub target: Option<Target>,
}

impl Figure {
    pub fn new(key: &'static str, value: f64, unit: Unit) -> Figure {
        Figure {
            key,
            value,
            unit,
            target: None,
        }
    }

    pub fn target(mut self, target: Target) -> Figure {
        self.target = Some(target);
        self
    }
}

/// One run's figures.
#[derive(Debug, Default)]
pub struct Run {
    pub c1: f64,
    pub figures: Vec<Figure>,
    /// Details that are not figures: answers by status, what was skipped, warnings.
    pub notes: Vec<String>,
    /// `/proc/loadavg`'s first three fields at the start and the end.
    pub load_start: String,
    pub load_end: String,
    /// The 1-minute load average as each phase started.
    pub phase_loads: Vec<(&'static str, String)>,
}

impl Run {
    pub fn push(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    pub fn value(&self, key: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|figure| figure.key == key)
            .map(|figure| figure.value)
    }
}

/// The figure's ratio to C1, as a number: rate / C1, or time × C1; none for counts and flags.
pub fn ratio(unit: Unit, value: f64, c1: f64) -> Option<f64> {
    match unit {
        Unit::PerSecond if c1 > 0.0 => Some(value / c1),
        Unit::Millis => Some(value / 1_000.0 * c1),
        Unit::Seconds => Some(value * c1),
        _ => None,
    }
}

fn format_ratio(unit: Unit, ratio: Option<f64>) -> String {
    match (unit, ratio) {
        (Unit::PerSecond, Some(ratio)) => format!("{ratio:.4} × C1"),
        (Unit::Millis | Unit::Seconds, Some(ratio)) => {
            format!("{} C1 commits", thousands(ratio))
        }
        _ => String::new(),
    }
}

/// Whether `value` meets `target`; `ratio` is its ratio to C1, `other` finds another figure.
fn met(
    target: Target,
    value: f64,
    ratio: Option<f64>,
    other: &dyn Fn(&str) -> Option<f64>,
) -> bool {
    match target {
        Target::AtLeast(bound) => value >= bound,
        Target::AtMost(bound) => value <= bound,
        Target::AtLeastTimesC1(fraction) => ratio.is_some_and(|ratio| ratio >= fraction),
        Target::AtLeastTimes(key, fraction) => {
            other(key).is_some_and(|base| value >= fraction * base)
        }
        Target::Zero | Target::No => value == 0.0,
        Target::Yes => value == 1.0,
    }
}

fn format_target(target: Target, unit: Unit) -> String {
    match target {
        Target::AtLeast(bound) => format!("≥ {}", format_value(bound, unit)),
        Target::AtMost(bound) => format!("≤ {}", format_value(bound, unit)),
        Target::AtLeastTimesC1(fraction) => format!("≥ {fraction} × C1"),
        Target::AtLeastTimes(key, fraction) => format!("≥ {fraction} × {key}"),
        Target::Zero => "0".to_owned(),
        Target::No => "no".to_owned(),
        Target::Yes => "yes".to_owned(),
    }
}

/// A value in its unit, rounded for reading.
pub fn format_value(value: f64, unit: Unit) -> String {
    match unit {
        Unit::PerSecond => format!("{}/s", thousands(value)),
        Unit::Millis if value < 10.0 => format!("{value:.2} ms"),
        Unit::Millis => format!("{} ms", thousands(value)),
        Unit::Seconds => format!("{value:.1} s"),
        Unit::Megabytes => format!("{value:.1} MB"),
        Unit::Count => thousands(value),
        Unit::Flag if value >= 0.5 => "yes".to_owned(),
        Unit::Flag => "no".to_owned(),
    }
}

/// A number rounded to an integer with thousands separators, or with two significant decimals
/// below 10.
pub fn thousands(value: f64) -> String {
    if value.abs() < 10.0 && value.fract() != 0.0 {
        return format!("{value:.2}");
    }
    let rounded = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in rounded.chars().enumerate() {
        if index > 0 && (rounded.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

fn verdict(target: Option<Target>, met_it: bool) -> &'static str {
    match (target, met_it) {
        (None, _) => "",
        (Some(_), true) => "yes",
        (Some(_), false) => "**no**",
    }
}

/// One run as a Markdown table.
pub fn print_run(number: usize, run: &Run) {
    println!(
        "\n### Run {number}: load average {} at start, {} at end (1/5/15 min)\n",
        run.load_start, run.load_end
    );
    let loads: Vec<String> = run
        .phase_loads
        .iter()
        .map(|(phase, load)| format!("{phase} {load}"))
        .collect();
    println!(
        "1-minute load average as each phase started: {}\n",
        loads.join(", ")
    );
    println!("| figure | value | ratio to C1 | target | met |");
    println!("|---|---:|---:|---|---|");
    println!(
        "| C1 (durable one-row commits/s) | {}/s | 1 × C1 | | |",
        thousands(run.c1)
    );
    for figure in &run.figures {
        let ratio = ratio(figure.unit, figure.value, run.c1);
        let met_it = figure
            .target
            .is_some_and(|target| met(target, figure.value, ratio, &|key| run.value(key)));
        println!(
            "| {} | {} | {} | {} | {} |",
            figure.key,
            format_value(figure.value, figure.unit),
            format_ratio(figure.unit, ratio),
            figure
                .target
                .map(|target| format_target(target, figure.unit))
                .unwrap_or_default(),
            verdict(figure.target, met_it),
        );
    }
    for note in &run.notes {
        println!("\n- {note}");
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

/// The medians over `runs` beside each run's value: the value's median, and the median of the
/// per-run ratios (each run's figure to its own C1).
pub fn print_medians(runs: &[Run]) {
    let Some(first) = runs.first() else {
        return;
    };
    let numbers: Vec<String> = (1..=runs.len()).map(|n| format!("run {n}")).collect();
    println!("\n### Medians of {} runs\n", runs.len());
    println!(
        "| figure | {} | median | median ratio to C1 | target | met |",
        numbers.join(" | ")
    );
    println!("|---|{}---:|---:|---|---|", "---:|".repeat(runs.len()));
    let c1s: Vec<String> = runs.iter().map(|run| thousands(run.c1)).collect();
    let median_c1 = median(&mut runs.iter().map(|run| run.c1).collect::<Vec<_>>());
    println!(
        "| C1 (durable one-row commits/s) | {} | {} | 1 × C1 | | |",
        c1s.join(" | "),
        thousands(median_c1)
    );
    let mut medians: BTreeMap<&str, f64> = BTreeMap::new();
    for figure in &first.figures {
        let mut values: Vec<f64> = runs
            .iter()
            .filter_map(|run| run.value(figure.key))
            .collect();
        medians.insert(figure.key, median(&mut values));
    }
    for figure in &first.figures {
        let cells: Vec<String> = runs
            .iter()
            .map(|run| {
                run.value(figure.key)
                    .map(|value| format_value(value, figure.unit))
                    .unwrap_or_default()
            })
            .collect();
        let mut ratios: Vec<f64> = runs
            .iter()
            .filter_map(|run| ratio(figure.unit, run.value(figure.key)?, run.c1))
            .collect();
        let median_ratio = (!ratios.is_empty()).then(|| median(&mut ratios));
        let value = medians.get(figure.key).copied().unwrap_or_default();
        let met_it = figure.target.is_some_and(|target| {
            met(target, value, median_ratio, &|key| {
                medians.get(key).copied()
            })
        });
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            figure.key,
            cells.join(" | "),
            format_value(value, figure.unit),
            format_ratio(figure.unit, median_ratio),
            figure
                .target
                .map(|target| format_target(target, figure.unit))
                .unwrap_or_default(),
            verdict(figure.target, met_it),
        );
    }
}
