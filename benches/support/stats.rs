//! Summaries of repeated measurements in the benchmarks.
#![allow(dead_code)]

/// The median of `values` (the upper middle for an even count); sorts them.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
