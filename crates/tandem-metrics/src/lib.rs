//! Prometheus metrics, shared by the node and the controller: both read most of what
//! they expose from their own state at scrape time (a [`Collector`]), so nothing is
//! kept twice; counters and histograms of the data path are kept as they happen.
//!
//! The exposition is OpenMetrics text (what `prometheus-client` writes, and what a
//! Prometheus server asks for first); every name carries the `tandem_` prefix.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use prometheus_client::collector::Collector;
use prometheus_client::encoding::NoLabelSet;
pub use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
pub use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
pub use prometheus_client::registry::Unit;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of one series: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric of `collectors`, as OpenMetrics text, names prefixed with `tandem_`.
pub fn render(collectors: Vec<Box<dyn Collector>>) -> String {
    let mut registry = Registry::with_prefix("tandem");
    for c in collectors {
        registry.register_collector(c);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// A latency histogram that many threads record into at once without a lock (one
/// atomic counter per bucket): `prometheus-client`'s own histogram takes a write lock
/// per observation, which 32 requests completing together on a fast disk contend for.
/// Buckets from 50 µs to about 13 s: a write to a local disk at queue depth 1 lands in
/// the lowest ones, a write that waited for a dead peer in the highest.
#[derive(Debug)]
pub struct Latency {
    /// Upper bounds in seconds, ascending; the last is +Inf.
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        let bounds: Vec<f64> = exponential_buckets(50e-6, 2.0, 19)
            .chain([f64::MAX])
            .collect();
        Latency {
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Latency {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' sum, so the +Inf bucket always equals it.
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Writes metric families: each a descriptor, then one series per row. A family's
/// `unit` is appended to its name (`peer_sent` in bytes: `tandem_peer_sent_bytes_total`).
pub struct Family<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
}

impl<'a, 'e> Family<'a, 'e> {
    pub fn new(encoder: &'a mut DescriptorEncoder<'e>) -> Self {
        Family { encoder }
    }

    /// A gauge family: `rows` are (labels, value).
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        rows: impl IntoIterator<Item = (Labels, f64)>,
    ) -> fmt::Result {
        let rows: Vec<_> = rows
            .into_iter()
            .map(|(l, v)| (l, ConstGauge::new(v)))
            .collect();
        self.live(
            name,
            help,
            unit,
            MetricType::Gauge,
            rows.iter().map(|(l, g)| (l.clone(), g)),
        )
    }

    /// A counter family (monotonic, `_total`): `rows` are (labels, value).
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        rows: impl IntoIterator<Item = (Labels, u64)>,
    ) -> fmt::Result {
        let rows: Vec<_> = rows
            .into_iter()
            .map(|(l, v)| (l, ConstCounter::new(v)))
            .collect();
        self.live(
            name,
            help,
            unit,
            MetricType::Counter,
            rows.iter().map(|(l, c)| (l.clone(), c)),
        )
    }

    /// A family of metrics of `metric_type`, such as counters and histograms kept as
    /// they happen: `rows` are (labels, metric). A family without labels has one series.
    pub fn live<'m, M: EncodeMetric + 'm>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        metric_type: MetricType,
        rows: impl IntoIterator<Item = (Labels, &'m M)>,
    ) -> fmt::Result {
        let mut m = self
            .encoder
            .encode_descriptor(name, help, unit.as_ref(), metric_type)?;
        for (labels, metric) in rows {
            if labels.is_empty() {
                return metric.encode(m);
            }
            metric.encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A state set as Prometheus users know it: one series per possible state, labelled
    /// `state`, 1 for the current one and 0 for the others; `rows` are (labels, every
    /// state's name, the current one's).
    pub fn states<'s>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (Labels, &'s [&'static str], &'s str)>,
    ) -> fmt::Result {
        let rows = rows.into_iter().flat_map(|(labels, all, current)| {
            all.iter().map(move |s| {
                let mut l = labels.clone();
                l.push(("state", (*s).to_owned()));
                (l, f64::from(u8::from(*s == current)))
            })
        });
        self.gauge(name, help, None, rows)
    }
}

/// One label.
pub fn label(name: &'static str, value: impl ToString) -> (&'static str, String) {
    (name, value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Sample;

    impl Collector for Sample {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            let mut f = Family::new(&mut encoder);
            f.gauge(
                "things",
                "Things.",
                None,
                [(vec![label("volume", "v1")], 2.0)],
            )?;
            f.counter("moved", "Bytes moved.", Some(Unit::Bytes), [(vec![], 7)])?;
            f.states(
                "role",
                "Role.",
                [(
                    vec![label("volume", "v1")],
                    &["Primary", "Secondary"][..],
                    "Primary",
                )],
            )
        }
    }

    #[test]
    fn latency_buckets_are_cumulative_and_end_at_the_count() {
        #[derive(Debug)]
        struct One(Latency);
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
                Family::new(&mut encoder).live(
                    "lat",
                    "Latency.",
                    Some(Unit::Seconds),
                    MetricType::Histogram,
                    [(vec![], &self.0)],
                )
            }
        }
        let l = Latency::default();
        l.observe(Duration::from_micros(10));
        l.observe(Duration::from_millis(3));
        l.observe(Duration::from_secs(60));
        let text = render(vec![Box::new(One(l))]);
        assert!(text.contains("tandem_lat_seconds_count 3\n"), "{text}");
        assert!(
            text.contains("tandem_lat_seconds_bucket{le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tandem_lat_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("tandem_lat_seconds_sum 60.00301"), "{text}");
    }

    #[test]
    fn families_render_as_openmetrics_with_the_prefix() {
        let text = render(vec![Box::new(Sample)]);
        assert!(text.contains("tandem_things{volume=\"v1\"} 2.0"), "{text}");
        assert!(text.contains("# TYPE tandem_moved_bytes counter"), "{text}");
        assert!(text.contains("\ntandem_moved_bytes_total 7\n"), "{text}");
        assert!(
            text.contains("tandem_role{volume=\"v1\",state=\"Primary\"} 1.0"),
            "{text}"
        );
        assert!(
            text.contains("tandem_role{volume=\"v1\",state=\"Secondary\"} 0.0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
