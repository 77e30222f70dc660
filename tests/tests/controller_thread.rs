//! The controller's one thread that owns the data plane: what reads the published state
//! (`/metrics`, the views) answers while it applies, a configuration that changes nothing writes
//! nothing, and a failed apply is tried again until the configuration changes. Run as root: each
//! test attaches a controller in a network namespace of its own.

use std::{path::PathBuf, time::Duration};

use lb_tests::{NetnsController, WEB_SERVICE, lb_userspace_bin, sandbox::write_atomically};

/// Bounds for what must happen, only ever waited for: nothing asserted depends on them.
const WAIT: Duration = Duration::from_secs(30);
/// A 10,000-service apply in a debug build is slow.
const LONG_WAIT: Duration = Duration::from_secs(600);

/// `services` Services `svc-N`, each with two endpoints (so 10,000 of them fit the default room
/// for backends), on addresses apart from [`WEB_SERVICE`]'s.
fn many_services(services: usize) -> String {
    let mut yaml = String::new();
    for s in 0..services {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\nspec:\n  \
             externalIPs: [198.19.{}.{}]\n  ports:\n  - port: 8080\n---\napiVersion: v1\n\
             kind: Endpoints\nmetadata:\n  name: svc-{s}\nsubsets:\n- addresses:\n",
            s >> 8,
            s & 255
        );
        for e in 0..2 {
            yaml += &format!(
                "  - ip: 198.20.{}.{}\n",
                (s * 2 + e) >> 8 & 255,
                (s * 2 + e) & 255
            );
        }
    }
    yaml
}

fn state_file(running: &NetnsController) -> PathBuf {
    PathBuf::from(&running.roots.state_root).join("veth-lb.json")
}

/// The value of the one sample of `name` (with `labels` as written in the text, if any).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

fn scrape_body(running: &NetnsController) -> String {
    let response = lb_tests::scrape_metrics(&running.ns).expect("scraping /metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// A scrape and `describe service` answer while the controller applies 10,000 services: both
/// complete before the apply logs "applied" (the order is asserted, no duration).
#[test]
fn a_scrape_and_describe_answer_during_a_large_apply() {
    let running = lb_tests::attach_in_netns("bigapply", &[]).unwrap();
    let controller = running.controller();
    assert_eq!(controller.count("applied"), 1, "the start-up apply");
    write_atomically(
        &running.config_dir().join("many.yaml"),
        &many_services(10_000),
    )
    .unwrap();
    controller.wait_for("applying", 1, LONG_WAIT).unwrap();
    let metrics = scrape_body(&running);
    let described = running
        .roots
        .cli(&lb_userspace_bin(), &["describe", "service", "web"])
        .unwrap();
    assert_eq!(
        controller.count("applied"),
        1,
        "the scrape and describe answered before the apply ended\n{}",
        controller.text()
    );
    // What they showed is the state applied before: the large apply is not in force yet.
    assert_eq!(sample(&metrics, "lb_config_generation"), 1.0);
    assert!(described.contains("198.18.100.1"), "{described}");
    controller.wait_for("applied", 2, LONG_WAIT).unwrap();
    let metrics = scrape_body(&running);
    assert_eq!(sample(&metrics, "lb_config_generation"), 2.0);
    assert!(metrics.contains("service=\"svc-9999\""), "{metrics}");
    running
        .roots
        .cli(&lb_userspace_bin(), &["describe", "service", "svc-9999"])
        .unwrap();
}

/// A change of the files that leaves the desired state as it is (the same manifest written
/// again) writes nothing: no apply, no new generation, the state file untouched.
#[test]
fn a_reload_that_changes_nothing_writes_nothing() {
    let running = lb_tests::attach_in_netns("noop", &[]).unwrap();
    let controller = running.controller();
    let file = state_file(&running);
    let before = (
        std::fs::read_to_string(&file).unwrap(),
        std::fs::metadata(&file).unwrap().modified().unwrap(),
    );
    write_atomically(&running.config_dir().join("web.yaml"), WEB_SERVICE).unwrap();
    controller
        .wait_for("configuration unchanged: nothing to apply", 1, WAIT)
        .unwrap();
    let after = (
        std::fs::read_to_string(&file).unwrap(),
        std::fs::metadata(&file).unwrap().modified().unwrap(),
    );
    assert_eq!(before, after, "the state file was written again");
    assert_eq!(controller.count("applied"), 1, "{}", controller.text());
    let metrics = scrape_body(&running);
    assert_eq!(sample(&metrics, "lb_config_generation"), 1.0);
    assert_eq!(sample(&metrics, "lb_config_last_reload_successful"), 1.0);
}

/// An apply that fails (more endpoints than the data plane has room for: `--max-backends 2`)
/// is reported and tried again, with backoff, until a configuration that applies replaces it.
#[test]
fn a_failed_apply_is_retried_until_the_configuration_changes() {
    let running = lb_tests::attach_in_netns_with("retry", &[], &["--max-backends", "2"]).unwrap();
    let controller = running.controller();
    let web = running.config_dir().join("web.yaml");
    let three = WEB_SERVICE.replace(
        "  - ip: 198.18.1.2\n",
        "  - ip: 198.18.1.2\n  - ip: 198.18.1.3\n",
    );
    assert_ne!(three, WEB_SERVICE);
    write_atomically(&web, &three).unwrap();
    controller.wait_for("trying again", 3, WAIT).unwrap();
    controller
        .wait_for("applying the configuration failed", 3, WAIT)
        .unwrap();
    let metrics = scrape_body(&running);
    assert!(
        sample(&metrics, "lb_apply_retries_total") >= 2.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "lb_reloads_total{result=\"failure\"}") >= 3.0,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "lb_config_last_reload_successful"), 0.0);
    assert_eq!(sample(&metrics, "lb_config_generation"), 1.0);
    // A configuration that fits (the same endpoints, ClientIP affinity) replaces the one
    // retried, and applies.
    let affinity = WEB_SERVICE.replace("spec:\n", "spec:\n  sessionAffinity: ClientIP\n");
    assert_ne!(affinity, WEB_SERVICE);
    write_atomically(&web, &affinity).unwrap();
    controller.wait_for("applied", 2, WAIT).unwrap();
    let metrics = scrape_body(&running);
    assert_eq!(sample(&metrics, "lb_config_last_reload_successful"), 1.0);
    assert_eq!(sample(&metrics, "lb_config_generation"), 2.0);
}

/// A stop signal while the controller thread applies 10,000 services is seen at once (the
/// "stopping" line comes before the apply's "applied"); the controller exits once the apply
/// ended, and its detach leaves nothing behind.
#[test]
fn a_stop_during_a_large_apply_detaches_once_it_ended() {
    use nix::{
        sys::signal::{Signal, kill},
        unistd::Pid,
    };
    let running = lb_tests::attach_in_netns("stopapply", &[]).unwrap();
    let controller = running.controller();
    write_atomically(
        &running.config_dir().join("many.yaml"),
        &many_services(10_000),
    )
    .unwrap();
    controller.wait_for("applying", 1, LONG_WAIT).unwrap();
    kill(Pid::from_raw(controller.child.id() as i32), Signal::SIGTERM).unwrap();
    controller.wait_for("stopping", 1, WAIT).unwrap();
    assert_eq!(
        controller.count("applied"),
        1,
        "the stop was seen during the apply\n{}",
        controller.text()
    );
    controller
        .wait_for("detached and removed", 1, LONG_WAIT)
        .unwrap();
    // `stop` finds it exited, and asserts its detach removed everything.
    let status = running.stop();
    assert!(status.success(), "{status}");
}
