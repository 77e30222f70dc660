//! `/metrics` as a scraper reads it: the body parses as OpenMetrics text (what
//! prometheus-client writes), strictly, and holds the families and labels the README promises
//! with the values of the running configuration.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Event, Reason};

/// One family: its type and its samples (name with suffix, labels, value).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// Parses OpenMetrics text strictly: HELP and TYPE once per family and before its samples,
/// families not interleaved, sample names the family's own (counters with `_total` or
/// `_created`), valid label names, quoted and escaped label values, no label set twice, numeric
/// values, and `# EOF` as the last line. Panics naming the line that breaks a rule.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let valid_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut seen = BTreeSet::new();
    let mut lines = text.lines().enumerate().peekable();
    let mut ended = false;
    while let Some((n, line)) = lines.next() {
        let at = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", n + 1) };
        if ended {
            at("after # EOF");
        }
        if line == "# EOF" {
            ended = lines.peek().is_none() || at("# EOF is not last");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let (keyword, rest) = rest.split_once(' ').unwrap_or_else(|| at("bare comment"));
            let (name, value) = rest.split_once(' ').unwrap_or_else(|| at("no value"));
            if !valid_name(name) {
                at("bad family name");
            }
            if current.as_deref() != Some(name) {
                if families.contains_key(name) {
                    at("family interleaved or repeated");
                }
                current = Some(name.to_owned());
            }
            let family = families.entry(name.to_owned()).or_default();
            if !family.samples.is_empty() {
                at("metadata after samples");
            }
            match keyword {
                "HELP" if !family.help => family.help = true,
                "TYPE" if family.kind.is_empty() => {
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                    ]
                    .contains(&value)
                    {
                        at("unknown type");
                    }
                    family.kind = value.to_owned();
                }
                _ => at("repeated or unknown metadata"),
            }
            continue;
        }
        // name{label="value",...} value
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| at("no value"));
        let value: f64 = value.parse().unwrap_or_else(|_| at("value not a number"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}')
                    .unwrap_or_else(|| at("unclosed labels")),
            ),
            None => (series, ""),
        };
        let family_name = current.clone().unwrap_or_else(|| at("sample before TYPE"));
        let family = families.get_mut(&family_name).expect("current family");
        let suffixes: &[&str] = match family.kind.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" | "unknown" => &[""],
            _ => at("type this parser does not expect here"),
        };
        if !suffixes
            .iter()
            .any(|s| name.strip_suffix(s) == Some(&family_name))
        {
            at("sample name is not its family's");
        }
        let mut parsed = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (label, after) = rest
                .split_once("=\"")
                .unwrap_or_else(|| at("label without value"));
            if !valid_name(label) {
                at("bad label name");
            }
            // The value runs to the first unescaped quote.
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => at("bad escape"),
                    },
                    Some((_, '\n')) | None => at("unterminated label value"),
                    Some((_, c)) => value.push(c),
                }
            };
            if parsed.insert(label.to_owned(), value).is_some() {
                at("label repeated");
            }
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        if !seen.insert((name.to_owned(), parsed.clone())) {
            at("series repeated");
        }
        family.samples.push((name.to_owned(), parsed, value));
    }
    assert!(ended, "no # EOF:\n{text}");
    for (name, family) in &families {
        assert!(
            family.help && !family.kind.is_empty(),
            "{name}: HELP and TYPE"
        );
    }
    families
}

/// `(labels of each sample, value)` of a family's samples named `sample`.
fn series(
    families: &BTreeMap<String, Family>,
    family: &str,
    sample: &str,
) -> Vec<(Vec<(String, String)>, f64)> {
    let family = families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}: {:?}", families.keys()));
    family
        .samples
        .iter()
        .filter(|(name, _, _)| name == sample)
        .map(|(_, labels, value)| (labels.clone().into_iter().collect(), *value))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The probes a DaemonSet points at the metrics listener answer once start-up is over.
#[test]
fn the_health_and_readiness_probes_answer() {
    let running = lb_tests::attach_in_netns("probes", &[]).unwrap();
    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = lb_tests::get_from_controller(&running.ns, path).unwrap();
        let (head, text) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert_eq!(text.trim(), body, "{path}");
    }
}

#[test]
fn metrics_parse_as_openmetrics_with_the_promised_families_and_labels() {
    let running = lb_tests::attach_in_netns("metrics", &[]).unwrap();
    let response = lb_tests::scrape_metrics(&running.ns).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "served as OpenMetrics: {head}"
    );
    let families = parse(body);

    let kinds: BTreeMap<&str, &str> = families
        .iter()
        .map(|(name, f)| (name.as_str(), f.kind.as_str()))
        .collect();
    let counter = "counter";
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("lb_bytes", counter),
            ("lb_config_generation", "gauge"),
            ("lb_endpoint_bytes", counter),
            ("lb_endpoint_new_flows", counter),
            ("lb_endpoint_packets", counter),
            ("lb_events", counter),
            ("lb_packets", counter),
            ("lb_reloads", counter),
            ("lb_service_bytes", counter),
            ("lb_service_new_flows", counter),
            ("lb_service_packets", counter),
        ])
    );
    let service = labels(&[
        ("frontend", "198.18.100.1:8080/TCP"),
        ("namespace", "default"),
        ("port", "8080"),
        ("service", "web"),
    ]);
    for family in [
        "lb_service_packets",
        "lb_service_bytes",
        "lb_service_new_flows",
    ] {
        assert_eq!(
            series(&families, family, &format!("{family}_total")),
            [(service.clone(), 0.0)],
            "{family}"
        );
    }
    for family in [
        "lb_endpoint_packets",
        "lb_endpoint_bytes",
        "lb_endpoint_new_flows",
    ] {
        let endpoint = |addr| {
            labels(&[
                ("endpoint", addr),
                ("namespace", "default"),
                ("port", "8080"),
                ("service", "web"),
            ])
        };
        let mut got = series(&families, family, &format!("{family}_total"));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                (endpoint("198.18.1.1:8080"), 0.0),
                (endpoint("198.18.1.2:8080"), 0.0)
            ],
            "{family}"
        );
    }
    // Every reason and every event, once each.
    for (family, label, names) in [
        (
            "lb_packets",
            "reason",
            Reason::ALL.iter().map(|r| r.name()).collect::<Vec<_>>(),
        ),
        (
            "lb_bytes",
            "reason",
            Reason::ALL.iter().map(|r| r.name()).collect(),
        ),
        (
            "lb_events",
            "event",
            Event::ALL.iter().map(|e| e.name()).collect(),
        ),
    ] {
        let got: BTreeSet<Vec<(String, String)>> =
            series(&families, family, &format!("{family}_total"))
                .into_iter()
                .map(|(labels, _)| labels)
                .collect();
        let expected: BTreeSet<_> = names.iter().map(|n| labels(&[(label, n)])).collect();
        assert_eq!(got, expected, "{family}");
    }
    let mut reloads = series(&families, "lb_reloads", "lb_reloads_total");
    reloads.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reloads,
        [
            (labels(&[("result", "failure")]), 0.0),
            (labels(&[("result", "success")]), 1.0)
        ]
    );
    assert_eq!(
        series(&families, "lb_config_generation", "lb_config_generation"),
        [(vec![], 1.0)]
    );
}
