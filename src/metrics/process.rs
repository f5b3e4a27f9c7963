//! The `process_*` metrics: the prometheus crate's process collector, with CPU time exported
//! to the kernel's resolution.
//!
//! The crate's collector keeps `process_cpu_seconds_total` as an integer counter of whole
//! seconds (`(utime + stime) / CLK_TCK`, truncated; tikv/rust-prometheus#430 made it an
//! `IntCounter`, #451 asks for it back as a float), so a proxy that has used 0.9 s of CPU
//! reads 0 and `rate()` over it is a step function. This wrapper passes every other family
//! through and replaces that one's value with `(utime + stime) / CLK_TCK` as a float (10 ms
//! steps on Linux), as the Go client and Prometheus itself export it.

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{Counter, MetricFamily};

const CPU_SECONDS: &str = "process_cpu_seconds_total";

pub struct ProcessMetrics {
    inner: ProcessCollector,
}

impl ProcessMetrics {
    pub fn for_self() -> Self {
        ProcessMetrics {
            inner: ProcessCollector::for_self(),
        }
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.inner.collect();
        if let Some(seconds) = cpu_seconds() {
            for family in families.iter_mut().filter(|f| f.name() == CPU_SECONDS) {
                for metric in family.mut_metric() {
                    let mut counter = Counter::default();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

/// User plus system CPU time of this process, in seconds; `None` when `/proc` cannot be read
/// (the collector's own value is kept then).
fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second();
    (ticks > 0).then(|| (stat.utime + stat.stime) as f64 / ticks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// This process's CPU time from `/proc/self/stat` read by hand (fields 14 and 15, after
    /// the parenthesised command name), as a reference independent of procfs.
    fn reference_cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        let after_name = &stat[stat.rfind(')').expect("command name") + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Field 3 (state) is after_name's first, so utime (14) and stime (15) are 11 and 12.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / procfs::ticks_per_second() as f64
    }

    fn exported_cpu_seconds(registry: &prometheus::Registry) -> f64 {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == CPU_SECONDS)
            .and_then(|f| f.get_metric().first())
            .map(|m| m.get_counter().get_value())
            .expect("process_cpu_seconds_total is exported")
    }

    #[test]
    fn cpu_seconds_are_exported_with_their_fraction() {
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(ProcessMetrics::for_self()))
            .unwrap();
        // Burn CPU until this process has used a time whose fraction is well away from a
        // whole second, so truncation (the crate's collector) and the real value differ by
        // at least 0.3 s.
        let give_up = Instant::now() + Duration::from_secs(30);
        let reference = loop {
            let seconds = reference_cpu_seconds();
            if seconds >= 0.3 && (0.3..0.7).contains(&seconds.fract()) {
                break seconds;
            }
            assert!(Instant::now() < give_up, "could not burn CPU time");
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_millis(5) {
                std::hint::black_box(spin.elapsed());
            }
        };
        // Read after the reference, from the same kernel counters: never less.
        let exported = exported_cpu_seconds(&registry);
        assert!(
            exported >= reference,
            "process_cpu_seconds_total = {exported}, but the process had used {reference} s"
        );
    }
}
