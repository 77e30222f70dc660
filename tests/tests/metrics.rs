//! `/metrics` as a scraper reads it: the body parses as the Prometheus text format 0.0.4
//! (what Prometheus scrapes and `promtool` reads), strictly, `promtool check metrics` finds
//! nothing to say about it, and it holds the families and labels the README promises with the
//! values of the running configuration.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use lb_common::{Event, Reason};

/// One family: its type and its samples (name with suffix, labels, value).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// Parses the Prometheus text format 0.0.4 strictly: HELP and TYPE once per family and before
/// its samples, families not interleaved, sample names the family's own (a counter's family
/// named with its `_total`, a histogram's samples `_bucket` with `le`, `_sum` and `_count`),
/// valid label names, quoted and escaped label values, no label set twice, numeric values, no
/// other comment (no OpenMetrics `# EOF`), and a newline after the last line. Panics naming
/// the line that breaks a rule.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let valid_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    assert!(text.ends_with('\n'), "no newline at the end:\n{text}");
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut seen = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", n + 1) };
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.strip_prefix(' ').unwrap_or_else(|| at("bad comment"));
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
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&value) {
                        at("unknown type");
                    }
                    if value == "counter" && !name.ends_with("_total") {
                        at("counter not named with _total");
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
            "counter" | "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => at("type this parser does not expect here"),
        };
        let Some(suffix) = suffixes
            .iter()
            .find(|s| name.strip_suffix(**s) == Some(&family_name))
        else {
            at("sample name is not its family's");
        };
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
        if (*suffix == "_bucket") != parsed.contains_key("le") {
            at("le on a bucket, and on buckets only");
        }
        if !seen.insert((name.to_owned(), parsed.clone())) {
            at("series repeated");
        }
        family.samples.push((name.to_owned(), parsed, value));
    }
    for (name, family) in &families {
        assert!(
            family.help && !family.kind.is_empty(),
            "{name}: HELP and TYPE"
        );
    }
    families
}

/// Runs `promtool check metrics` (Prometheus' own parser and linter) on `body`; panics unless
/// it succeeds and says nothing.
fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running promtool: {e}. promtool checks the metrics: `cargo xtask setup` \
                 installs it (Debian package `prometheus`)"
            )
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(body.as_bytes())
        .expect("writing the metrics to promtool");
    let output = child.wait_with_output().expect("promtool's verdict");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.is_empty(),
        "promtool check metrics ({}):\n{said}\non:\n{body}",
        output.status
    );
}

/// The body of a scrape of the controller in `running`'s namespace, checked to be served
/// with the text format's content type.
fn scrape(running: &lb_tests::NetnsController) -> String {
    let response = lb_tests::scrape_metrics(&running.ns).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "served as the Prometheus text format: {head}"
    );
    body.to_owned()
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
fn promtool_check_metrics_finds_nothing_to_say() {
    let running = lb_tests::attach_in_netns("promtool", &[]).unwrap();
    promtool_check(&scrape(&running));
}

/// The families served by default and their types.
fn default_kinds() -> BTreeMap<&'static str, &'static str> {
    let counter = "counter";
    let gauge = "gauge";
    BTreeMap::from([
        ("lb_apply_duration_seconds", "histogram"),
        ("lb_apply_retries_total", counter),
        ("lb_build_info", gauge),
        ("lb_bytes_total", counter),
        ("lb_config_generation", gauge),
        ("lb_config_last_reload_success_timestamp_seconds", gauge),
        ("lb_config_last_reload_successful", gauge),
        ("lb_events_total", counter),
        ("lb_packets_total", counter),
        ("lb_reloads_total", counter),
        ("lb_service_bytes_total", counter),
        ("lb_service_new_flows_total", counter),
        ("lb_service_packets_total", counter),
        ("lb_service_table_info", gauge),
    ])
}

fn kinds(families: &BTreeMap<String, Family>) -> BTreeMap<&str, &str> {
    families
        .iter()
        .map(|(name, f)| (name.as_str(), f.kind.as_str()))
        .collect()
}

#[test]
fn metrics_parse_as_the_text_format_with_the_promised_families_and_labels() {
    let started = SystemTime::now();
    let running = lb_tests::attach_in_netns("metrics", &[]).unwrap();
    let families = parse(&scrape(&running));
    let scraped = SystemTime::now();

    // Per Service port by default: no endpoint series.
    assert_eq!(kinds(&families), default_kinds());
    let service = labels(&[
        ("family", "IPv4"),
        ("namespace", "default"),
        ("port", "8080/TCP"),
        ("service", "web"),
    ]);
    for family in [
        "lb_service_packets_total",
        "lb_service_bytes_total",
        "lb_service_new_flows_total",
    ] {
        assert_eq!(
            series(&families, family, family),
            [(service.clone(), 0.0)],
            "{family}"
        );
    }
    // The table's digest, one series per data-plane service with a table.
    let tables = series(&families, "lb_service_table_info", "lb_service_table_info");
    let [(table_labels, 1.0)] = &tables[..] else {
        panic!("one table: {tables:?}")
    };
    let digest = table_labels
        .iter()
        .find(|(k, _)| k == "digest")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 23,
        "{digest}"
    );
    // Every reason and every event, once each.
    for (family, label, names) in [
        (
            "lb_packets_total",
            "reason",
            Reason::ALL.iter().map(|r| r.name()).collect::<Vec<_>>(),
        ),
        (
            "lb_bytes_total",
            "reason",
            Reason::ALL.iter().map(|r| r.name()).collect(),
        ),
        (
            "lb_events_total",
            "event",
            Event::ALL.iter().map(|e| e.name()).collect(),
        ),
    ] {
        let got: BTreeSet<Vec<(String, String)>> = series(&families, family, family)
            .into_iter()
            .map(|(labels, _)| labels)
            .collect();
        let expected: BTreeSet<_> = names.iter().map(|n| labels(&[(label, n)])).collect();
        assert_eq!(got, expected, "{family}");
    }
    let mut reloads = series(&families, "lb_reloads_total", "lb_reloads_total");
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
    assert_eq!(
        series(
            &families,
            "lb_config_last_reload_successful",
            "lb_config_last_reload_successful"
        ),
        [(vec![], 1.0)]
    );
    let name = "lb_config_last_reload_success_timestamp_seconds";
    let [(no_labels, at)] = &series(&families, name, name)[..] else {
        panic!("one {name}");
    };
    let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64;
    assert!(
        no_labels.is_empty() && unix(started) <= *at && *at <= unix(scraped),
        "{name} {at}: the first apply, between {started:?} and {scraped:?}"
    );
    // The build: its version, and a commit only when the build was given one.
    let [(build, 1.0)] = &series(&families, "lb_build_info", "lb_build_info")[..] else {
        panic!("one lb_build_info, 1");
    };
    let build: BTreeMap<_, _> = build.iter().cloned().collect();
    assert_eq!(build["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        build.keys().all(|k| k == "version" || k == "commit"),
        "{build:?}"
    );
    // One apply so far, the first, timed into buckets from 1 ms to 10 s.
    let histogram = "lb_apply_duration_seconds";
    assert_eq!(
        series(&families, histogram, &format!("{histogram}_count")),
        [(vec![], 1.0)]
    );
    let buckets = series(&families, histogram, &format!("{histogram}_bucket"));
    let bounds: Vec<&str> = buckets
        .iter()
        .map(|(labels, _)| labels[0].1.as_str())
        .collect();
    assert_eq!(
        bounds,
        [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
            "2.5", "5.0", "10.0", "+Inf"
        ]
    );
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1) && buckets.last().unwrap().1 == 1.0,
        "cumulative, ending with the one apply: {buckets:?}"
    );
    promtool_check(&scrape(&running));
}

/// `--metrics-endpoints` adds one series per endpoint; `--log-format json` logs a JSON
/// object a line.
#[test]
fn endpoint_series_only_when_asked_and_json_logs() {
    let running = lb_tests::attach_in_netns_with(
        "metricsep",
        &[],
        &["--metrics-endpoints", "--log-format", "json"],
    )
    .unwrap();
    let body = scrape(&running);
    promtool_check(&body);
    let families = parse(&body);
    let mut expected = default_kinds();
    for family in [
        "lb_endpoint_bytes_total",
        "lb_endpoint_new_flows_total",
        "lb_endpoint_packets_total",
    ] {
        expected.insert(family, "counter");
    }
    assert_eq!(kinds(&families), expected);
    let endpoint = |addr| {
        labels(&[
            ("endpoint", addr),
            ("namespace", "default"),
            ("port", "8080/TCP"),
            ("service", "web"),
        ])
    };
    for family in [
        "lb_endpoint_packets_total",
        "lb_endpoint_bytes_total",
        "lb_endpoint_new_flows_total",
    ] {
        let mut got = series(&families, family, family);
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
    let log = running.controller().text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line:?}"))
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "controller ready" && l["level"] == "INFO"),
        "{log}"
    );
}

/// `lb_config_last_reload_successful` goes to 0 when a configuration is rejected and back to 1
/// once the files are again those in force, though nothing new is applied.
#[test]
fn the_last_reload_is_reported_failed_then_good_again() {
    let running = lb_tests::attach_in_netns("metricsrl", &[]).unwrap();
    let value = |body: &str, name: &str| -> f64 {
        series(&parse(body), name, name)
            .first()
            .unwrap_or_else(|| panic!("{name}:\n{body}"))
            .1
    };
    let successful = "lb_config_last_reload_successful";
    let timestamp = "lb_config_last_reload_success_timestamp_seconds";
    let body = scrape(&running);
    let applied_at = value(&body, timestamp);
    assert_eq!(value(&body, successful), 1.0);

    let broken = running.config_dir().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Service\nmetadata: {name: [}\n",
    )
    .unwrap();
    running
        .controller()
        .wait_for("configuration rejected", 1, Duration::from_secs(10))
        .unwrap();
    let body = scrape(&running);
    assert_eq!(value(&body, successful), 0.0, "{body}");
    assert_eq!(value(&body, timestamp), applied_at, "{body}");
    let reloads = series(&parse(&body), "lb_reloads_total", "lb_reloads_total");
    assert!(
        reloads.contains(&(labels(&[("result", "failure")]), 1.0)),
        "{reloads:?}"
    );

    // Reverted: the configuration read is the one applied already.
    std::fs::remove_file(&broken).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(&running);
        if value(&body, successful) == 1.0 {
            assert_eq!(value(&body, timestamp), applied_at, "nothing applied since");
            let histogram = "lb_apply_duration_seconds";
            assert_eq!(
                series(&parse(&body), histogram, &format!("{histogram}_count")),
                [(vec![], 1.0)],
                "one apply, the first"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still failed after the revert:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
