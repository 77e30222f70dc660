//! `lb-userspace`: the load balancer's controller and CLI.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::{Counter, Reason};
use lb_userspace::{
    AttachMode, Dataplane, announce,
    api::{API_SETTLE, ApiSource},
    api_events::{self, EventSink},
    assign::{AssignSettings, Assignment, RefusalAnnouncer},
    conntrack,
    controller::{AppliedState, Controller},
    dataplane::{CounterReader, DataplaneError, LoadOptions},
    events::{ServiceEvent, now_timestamp},
    health::HealthChecks,
    ipam::Pool,
    lease::{self, Leadership, LeaseSettings},
    manifest::{ConfigError, Manifests},
    metrics::{self, Reloads},
    model::{self, Cluster, Options},
    pins::{self, Paths},
    redirects,
    source::{FileSource, Settle, Snapshots},
    views,
};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    time::Instant,
};
use tracing::{error, info, warn};

/// The first wait before a failed apply is tried again; each failure doubles it up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two tries of a failed apply.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often the local pods are looked for between applies (see
/// `Controller::refresh_local_pods`).
const LOCAL_PODS_REFRESH: Duration = Duration::from_secs(10);

/// Logged once `attach` is fully up: stop handlers installed, metrics served, first apply
/// done. Nothing else logs these words.
const READY_LINE: &str = "controller ready";

/// XDP service load balancer for Kubernetes `Service`s of type LoadBalancer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Lines for people (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    /// Tables and fields, as kubectl prints them, with our live columns.
    Wide,
    /// Kubernetes objects in JSON (`v1 Service`, `v1 List`), the live state in `lbXdpRs`.
    Json,
    /// Kubernetes objects in YAML, as `-o json`.
    Yaml,
}

impl From<Output> for views::Format {
    fn from(output: Output) -> Self {
        match output {
            Output::Wide => Self::Wide,
            Output::Json => Self::Json,
            Output::Yaml => Self::Yaml,
        }
    }
}

/// What following the API adds: the address assignment and its lease.
#[derive(Debug, clap::Args)]
struct InClusterArgs {
    /// Addresses for LoadBalancer Services beside the `LoadBalancerIPPool` objects: a CIDR or
    /// START-STOP (repeatable; pools `flag-0`, `flag-1`...).
    #[arg(long = "ip-pool")]
    ip_pools: Vec<String>,
    /// Assign no addresses: another implementation does, and this one serves what the
    /// Services' status says.
    #[arg(long)]
    no_ipam: bool,
    /// The namespace of the Lease that elects the one node that assigns addresses and writes
    /// status and events (in a pod: its own namespace, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "lb-xdp-system")]
    lease_namespace: String,
    /// The Lease's name.
    #[arg(long, default_value = "lb-xdp-leader")]
    lease_name: String,
    /// How long the Lease holds without a renewal (whole seconds): a dead leader is replaced
    /// after at most this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal (shorter than the
    /// duration: it stops before anyone else may start).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_renew_deadline: Duration,
    /// How often the Lease is looked at (and renewed).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    lease_retry_period: Duration,
}

/// `15s`, `1500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let parse = |number: &str| number.parse::<u64>().map_err(|e| format!("{text:?}: {e}"));
    if let Some(ms) = text.strip_suffix("ms") {
        Ok(Duration::from_millis(parse(ms)?))
    } else if let Some(s) = text.strip_suffix('s') {
        Ok(Duration::from_secs(parse(s)?))
    } else {
        Err(format!(
            "{text:?}: expected a duration such as 15s or 1500ms"
        ))
    }
}

#[derive(Debug, clap::Args)]
struct Roots {
    /// bpffs folder of the pinned maps and links (one subfolder per interface).
    #[arg(long, default_value = pins::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Folder of the applied states (one file per interface).
    #[arg(long, default_value = pins::DEFAULT_STATE_ROOT)]
    state_root: PathBuf,
}

// Parsed once at start: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Load the data plane, attach it to IFACE, serve the services of --config and follow its
    /// changes until Ctrl-C or SIGTERM.
    Attach {
        /// The client-facing interface.
        iface: String,
        /// A manifest file or a folder of them (Service, Endpoints, EndpointSlice, Node, List).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Follow the Kubernetes API instead of files: Services, EndpointSlices and Nodes,
        /// listed and watched. In a pod, with its service account; elsewhere with KUBECONFIG
        /// or ~/.kube/config.
        #[arg(long, conflicts_with = "config")]
        api: bool,
        /// Follow the Kubernetes API described by this kubeconfig (implies --api).
        #[arg(long, conflicts_with = "config")]
        kubeconfig: Option<PathBuf>,
        #[command(flatten)]
        in_cluster: InClusterArgs,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t)]
        mode: AttachMode,
        /// Node addresses on which nodePorts are served too.
        #[arg(long = "node-ip")]
        node_ips: Vec<IpAddr>,
        /// Where Prometheus metrics are served (loopback by default).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: SocketAddr,
        /// Serve per-endpoint series too (`lb_endpoint_*`, one per endpoint and family: as many
        /// as the endpoints, renewed by every rollout). Without it, series are per Service port.
        #[arg(long)]
        metrics_endpoints: bool,
        /// Log format.
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
        /// Seconds between counter summaries in the log (0: only at exit).
        #[arg(long, default_value_t = 10)]
        stats_interval: u64,
        /// On Ctrl-C/SIGTERM leave the data plane attached and serving (pinned), for a
        /// restart or an upgrade; `detach` removes it. Without it, exiting detaches. A fresh
        /// attach stopped before its first apply completed is removed all the same.
        #[arg(long)]
        keep_on_exit: bool,
        /// Capacity of the connection table.
        #[arg(long, default_value_t = lb_common::maps::DEFAULT_CONNTRACK_SIZE)]
        conntrack_size: u32,
        /// Backends (service endpoints, counted per service) the data plane has room for. Each
        /// costs 24 bytes of counters per possible CPU, plus 36 bytes once.
        #[arg(long, default_value_t = lb_common::maps::DEFAULT_MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(1..))]
        max_backends: u32,
        /// Serve VIPs that are addresses of this host (refused by default: they would capture
        /// the host's own traffic).
        #[arg(long)]
        allow_host_addresses: bool,
        /// This node's name, as endpoints' `nodeName` gives it (for `Local` traffic
        /// policies). Default: the host name.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// The UDP port of the tunnel (GUE) to the other nodes: an endpoint on another node
        /// (its `nodeName` names a Node object with an address) is reached through it, and
        /// that node answers the client itself. 0 turns the tunnel off (such endpoints are
        /// DNATed here and routed by the host).
        #[arg(long, default_value_t = lb_common::maps::DEFAULT_TUNNEL_PORT)]
        tunnel_port: u16,
        /// Serve cluster IPs on IFACE too (by default only load balancer IPs, external IPs
        /// and node ports are: a cluster IP is the cluster's own address).
        #[arg(long)]
        serve_cluster_ips: bool,
        /// The `spec.loadBalancerClass` served: Services of another class are skipped (with a
        /// warning); Services with none are served.
        #[arg(long, default_value = model::DEFAULT_LOAD_BALANCER_CLASS)]
        load_balancer_class: String,
        /// Announce the served VIPs to the routing daemon: one blackhole route per address
        /// (protocol 250) in this kernel routing table, whose whole content the controller owns.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        announce_table: Option<u32>,
        /// With --announce-table, how long a stop (without --keep-on-exit) keeps serving after
        /// withdrawing the announcements, before it detaches.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain_period: Duration,
        #[command(flatten)]
        roots: Roots,
    },
    /// Remove everything `attach` created for IFACE: pinned links (which detaches the programs
    /// once no controller holds them), pinned maps and the applied state.
    Detach {
        /// The interface.
        iface: String,
        #[command(flatten)]
        roots: Roots,
    },
    /// List services, as `kubectl get services`, with live endpoint and packet counts.
    Get {
        /// What to list: `services` (or `svc`).
        resource: String,
        /// Only this service.
        name: Option<String>,
        /// The namespace listed.
        #[arg(short, long, default_value = lb_userspace::manifest::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Every namespace (a NAMESPACE column first).
        #[arg(short = 'A', long, conflicts_with_all = ["name", "namespace"])]
        all_namespaces: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "wide")]
        output: Output,
        #[command(flatten)]
        roots: Roots,
    },
    /// Show a service, as `kubectl describe service`, with live per-endpoint counters.
    Describe {
        /// `service` (or `svc`).
        resource: String,
        /// The service's name.
        name: String,
        /// The service's namespace.
        #[arg(short, long, default_value = lb_userspace::manifest::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "wide")]
        output: Output,
        #[command(flatten)]
        roots: Roots,
    },
    /// Which backend a flow gets and why: `explain 198.18.0.1:40000 198.18.100.1:8080/TCP`.
    Explain {
        /// The client's address and port.
        source: String,
        /// The VIP, port and protocol.
        frontend: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "wide")]
        output: Output,
        #[command(flatten)]
        roots: Roots,
    },
    /// Print the LoadBalancerIPPool CustomResourceDefinition (YAML), for `kubectl apply -f -`.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Attach { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    };
    init_tracing(log_format);
    match cli.command {
        Command::Attach {
            iface,
            config,
            api,
            kubeconfig,
            in_cluster,
            mode,
            node_ips,
            metrics_addr,
            metrics_endpoints,
            log_format: _,
            stats_interval,
            keep_on_exit,
            conntrack_size,
            max_backends,
            allow_host_addresses,
            node_name,
            serve_cluster_ips,
            tunnel_port,
            load_balancer_class,
            announce_table,
            drain_period,
            roots,
        } => {
            lb_userspace::privileges::require_for_attach()?;
            let source = match (config, api, kubeconfig) {
                (Some(path), _, _) => SourceSetting::File(path),
                (None, _, Some(kubeconfig)) => SourceSetting::Api {
                    kubeconfig: Some(kubeconfig),
                    in_cluster,
                },
                (None, true, None) => SourceSetting::Api {
                    kubeconfig: None,
                    in_cluster,
                },
                (None, false, None) => SourceSetting::None,
            };
            let from_api = matches!(source, SourceSetting::Api { .. });
            let underlay_mtu = lb_userspace::host::mtu(&iface).unwrap_or(1500);
            let settings = AttachSettings {
                iface,
                source,
                mode,
                options: Options {
                    node_ips,
                    host_addresses: Vec::new(),
                    allow_host_addresses,
                    node_name: match node_name {
                        Some(name) => name,
                        None => host_name()?,
                    },
                    serve_cluster_ips,
                    load_balancer_class,
                    serve_requested_ips: !from_api,
                    tunnel_port,
                    underlay_mtu,
                    excluded_from_load_balancers: false,
                },
                metrics_addr,
                metrics_endpoints,
                stats_interval,
                keep_on_exit,
                conntrack_size,
                max_backends,
                announce_table,
                drain_period,
            };
            attach(settings, &roots).await
        }
        Command::Detach { iface, roots } => detach(&iface, &roots),
        Command::Get {
            resource,
            name,
            namespace,
            all_namespaces,
            output,
            roots,
        } => {
            check_resource(&resource)?;
            let all = views::read_all(&roots.state_root, &roots.pin_root)?;
            let namespaces = if all_namespaces {
                views::Namespaces::All
            } else {
                views::Namespaces::One(&namespace)
            };
            let text = views::get_services(
                &all,
                namespaces,
                name.as_deref(),
                output.into(),
                now_timestamp(),
            )?;
            if text.is_empty() {
                eprintln!("{}", views::no_resources(namespaces));
            }
            print!("{text}");
            Ok(())
        }
        Command::Describe {
            resource,
            name,
            namespace,
            output,
            roots,
        } => {
            check_resource(&resource)?;
            let all = views::read_all(&roots.state_root, &roots.pin_root)?;
            print!(
                "{}",
                views::describe_service(&all, &namespace, &name, output.into(), now_timestamp())?
            );
            Ok(())
        }
        Command::Explain {
            source,
            frontend,
            output,
            roots,
        } => {
            let all = views::read_all(&roots.state_root, &roots.pin_root)?;
            print!(
                "{}",
                views::explain(&all, &source, &frontend, output.into())?
            );
            Ok(())
        }
        Command::Crd => {
            print!("{}", lb_userspace::crd::crd_yaml());
            Ok(())
        }
    }
}

/// Logs to standard output, filtered by `RUST_LOG` (default `info`, without kube-rs's client
/// lines: it logs every failed request and every watch stream cut, where a 409 is how a
/// status write or a lease renewal learns it is late, and an outage is logged once per
/// resource by the API source, which gets every error kube-rs sees).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube_client=off".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        // Colours only for a person at a terminal: a log file or a collector gets plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

/// The host name, the default node name (as the kubelet's).
fn host_name() -> anyhow::Result<String> {
    let name = nix::unistd::gethostname()?;
    Ok(name.to_string_lossy().to_lowercase())
}

fn check_resource(resource: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(resource, "service" | "services" | "svc"),
        "unknown resource {resource:?}: only services are served"
    );
    Ok(())
}

/// Where the desired state comes from.
enum SourceSetting {
    /// Nowhere: the data plane is attached and serves nothing (or what it adopted).
    None,
    /// A manifest file or folder.
    File(PathBuf),
    /// The Kubernetes API (the kubeconfig, or the inferred configuration).
    Api {
        kubeconfig: Option<PathBuf>,
        in_cluster: InClusterArgs,
    },
}

/// A running source, kept for as long as its snapshots are read.
enum SourceHandle {
    // Held for its watcher: dropping it stops the watch.
    File(#[allow(dead_code)] FileSource),
    Api(Box<InCluster>),
}

/// What runs when following the API: the source, the lease, the events and the address
/// assignment (on the leader).
struct InCluster {
    source: ApiSource,
    leadership: Leadership,
    events: EventSink,
    assignment: Option<Assignment>,
}

impl InCluster {
    /// Starts following the API of `client`: the watches, the lease campaign, the event
    /// writer and, unless `--no-ipam`, the address assignment.
    fn start(
        client: &kube::Client,
        args: &InClusterArgs,
        options: &Options,
    ) -> anyhow::Result<(Self, Snapshots)> {
        let flag_pools = args
            .ip_pools
            .iter()
            .enumerate()
            .map(|(index, text)| Pool::from_flag(index, text))
            .collect::<Result<Vec<_>, _>>()?;
        let (source, snapshots) = ApiSource::start(client, API_SETTLE);
        // One identity per process: the node, and the pod when there is one (a DaemonSet's
        // pod replaced on its node must not renew its predecessor's lease by name alone).
        let identity = match std::env::var("POD_NAME") {
            Ok(pod) if !pod.is_empty() => format!("{}_{pod}", options.node_name),
            _ => options.node_name.clone(),
        };
        let leadership = lease::spawn(
            client.clone(),
            LeaseSettings {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity,
                duration: args.lease_duration,
                renew_deadline: args.lease_renew_deadline,
                retry_period: args.lease_retry_period,
            },
        )?;
        let events = EventSink::spawn(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: api_events::REPORTING_CONTROLLER.into(),
                instance: Some(options.node_name.clone()),
            },
        );
        let assignment = (!args.no_ipam).then(|| {
            Assignment::start(
                client,
                source.stores.services.clone(),
                source.service_changes.clone(),
                source.listed.clone(),
                leadership.leading.clone(),
                events.clone(),
                AssignSettings {
                    class: options.load_balancer_class.clone(),
                    flag_pools,
                },
            )
        });
        Ok((
            Self {
                source,
                leadership,
                events,
                assignment,
            },
            snapshots,
        ))
    }

    /// Tells configuration refusals to the API (from the leader only).
    fn announcer(&self) -> RefusalAnnouncer {
        RefusalAnnouncer::new(
            self.source.stores.services.clone(),
            self.leadership.leading.clone(),
            self.events.clone(),
        )
    }

    /// The figures of the watches, the lease, the assignment and the events.
    fn figures(&self) -> InClusterFigures {
        let health = self.source.health.clone();
        let leading = self.leadership.leading.clone();
        let assign = self.assignment.as_ref().map(|a| a.figures.clone());
        let events = self.events.clone();
        Arc::new(move || {
            let load =
                |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
            let mut figures = metrics::InCluster {
                watches: health
                    .watches
                    .iter()
                    .map(|w| metrics::WatchFigures {
                        resource: w.resource,
                        connected: w.connected(),
                        errors: load(&w.errors),
                    })
                    .collect(),
                leading: Some(*leading.borrow()),
                events_published: events.published(),
                events_dropped: events.dropped(),
                ..metrics::InCluster::default()
            };
            if let Some(assign) = &assign {
                figures.addresses_assigned = load(&assign.assigned);
                figures.services_refused = load(&assign.refused);
                figures.status_writes = [
                    ("success", load(&assign.writes_ok)),
                    ("conflict", load(&assign.writes_conflict)),
                    ("error", load(&assign.writes_failed)),
                ];
            }
            figures
        })
    }
}

struct AttachSettings {
    iface: String,
    source: SourceSetting,
    mode: AttachMode,
    options: Options,
    metrics_addr: SocketAddr,
    metrics_endpoints: bool,
    stats_interval: u64,
    keep_on_exit: bool,
    conntrack_size: u32,
    max_backends: u32,
    announce_table: Option<u32>,
    drain_period: Duration,
}

/// What the controller thread applied last, published after every change of it (an apply, a
/// rejection's event, the local pods found): metrics and health checks read it, never the
/// controller.
type Applied = watch::Receiver<Arc<AppliedState>>;

/// SIGTERM and SIGINT, listened to from the first moment of `attach`.
///
/// Once installed, a stop signal no longer kills the process by its default action: it waits
/// here until the controller looks, so none is lost between two looks either (which is also why
/// the streams are made once and kept, rather than made anew at every turn of the loop).
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for a stop signal.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }

    /// Whether a stop signal has arrived, without waiting.
    async fn arrived(&mut self) -> bool {
        tokio::select! {
            biased;
            () = self.recv() => true,
            () = std::future::ready(()) => false,
        }
    }
}

/// What `attach` has set up for its interface, so that a stop or an error at any moment of
/// start-up, and the exit after it, take down exactly that (or keep it, with `--keep-on-exit`).
struct Setup {
    paths: Paths,
    /// A previous controller left a data plane here (pins or a state), which this run adopts.
    inherited: bool,
    /// The data plane, once loaded.
    controller: Option<Controller>,
    /// The data plane serves what it was asked to: this run's first apply completed (or, without
    /// `--config`, it is attached).
    complete: bool,
    /// A stop signal arrived; start-up goes no further.
    stopped: bool,
    /// Start-up got as far as making folders: there may be something to remove.
    touched: bool,
}

impl Setup {
    fn new(paths: Paths) -> Self {
        let inherited = paths.state_file.exists()
            || paths.redirects_file.exists()
            || std::fs::read_dir(&paths.pin_dir).is_ok_and(|mut d| d.next().is_some());
        Self {
            paths,
            inherited,
            controller: None,
            complete: false,
            stopped: false,
            touched: false,
        }
    }

    /// Runs a slow start-up step (loading, attaching, the first apply) on a blocking thread
    /// while listening for a stop signal. The step always runs to its end: a kernel call cannot
    /// be abandoned half-way, and whatever it made must be in hand to be taken down. A signal
    /// that arrives meanwhile marks the start-up stopped.
    async fn step<T: Send + 'static>(
        &mut self,
        stop: &mut StopSignals,
        what: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let mut task = tokio::task::spawn_blocking(work);
        let output = tokio::select! {
            biased;
            () = stop.recv() => {
                info!(step = what, "stop signal during start-up: finishing this step, then stopping");
                self.stopped = true;
                task.await
            }
            output = &mut task => output,
        };
        output.with_context(|| format!("{what} did not finish"))
    }

    /// Whether start-up must go no further: a stop signal arrived during or since the last step.
    async fn should_stop(&mut self, stop: &mut StopSignals) -> bool {
        if !self.stopped && stop.arrived().await {
            info!("stop signal during start-up");
            self.stopped = true;
        }
        self.stopped
    }

    /// The end of the run, on a stop at any moment: the data plane is removed, unless
    /// `--keep-on-exit` and there is a whole data plane to keep (this run completed its start-up,
    /// or it found one serving, which is left as it was). A fresh attach stopped before its first
    /// apply completed is removed even with `--keep-on-exit`: it would keep serving nothing, or
    /// half of what was asked.
    fn finish(self, keep_on_exit: bool) -> anyhow::Result<()> {
        if let Some(controller) = &self.controller {
            log_counters(controller.dataplane().reason_counters());
        }
        if keep_on_exit && (self.complete || self.inherited) {
            info!(pins = %self.paths.pin_dir.display(), "leaving the data plane attached and serving (--keep-on-exit)");
            return Ok(());
        }
        if keep_on_exit {
            info!("stopped before the data plane was complete: removing it despite --keep-on-exit");
        }
        self.remove()
    }

    /// The end of a start-up that failed: a data plane found serving is left as it was (the
    /// previous controller's, still serving); one this run made is removed.
    fn fail(self, error: anyhow::Error) -> anyhow::Error {
        if self.touched
            && !self.inherited
            && let Err(cleanup) = self.remove()
        {
            warn!(error = %cleanup, "removing what the failed start-up made");
        }
        error
    }

    /// Removes the pins, the state and the links, and puts the ICMP redirect settings back:
    /// safe at any moment, whatever exists yet.
    fn remove(mut self) -> anyhow::Result<()> {
        if let Err(e) = announce::withdraw_recorded(&self.paths.state_file) {
            warn!(error = %e, "withdrawing the announced addresses");
        }
        Dataplane::unpin_all(&self.paths.pin_dir).context("removing the pins")?;
        let _ = std::fs::remove_file(&self.paths.state_file);
        if let Err(e) = redirects::restore(&self.paths.redirects_file) {
            warn!(error = %e, "putting the ICMP redirect settings back");
        }
        if let Some(controller) = &mut self.controller {
            controller.dataplane_mut().detach_all()?;
        }
        info!("detached and removed");
        Ok(())
    }
}

async fn attach(settings: AttachSettings, roots: &Roots) -> anyhow::Result<()> {
    // First of all, before anything exists: a stop signal that arrives later is handled, never
    // the default action that would kill the process with pins, links and state half made.
    let mut stop = StopSignals::install()?;
    let keep_on_exit = settings.keep_on_exit;
    let mut setup = Setup::new(Paths::new(
        &roots.pin_root,
        &roots.state_root,
        &settings.iface,
    ));
    match start(settings, roots, &mut setup, &mut stop).await {
        Err(e) => Err(setup.fail(e)),
        Ok(None) => setup.finish(keep_on_exit),
        Ok(Some(running)) => {
            let controller = setup
                .controller
                .take()
                .expect("a started data plane has a controller");
            setup.controller = running.serve(controller, &mut stop, keep_on_exit).await;
            setup.finish(keep_on_exit)
        }
    }
}

/// What runs once start-up is done: the controller thread's inputs and outputs, and the tasks
/// that read what it publishes.
struct Running {
    options: Options,
    stats_interval: u64,
    reloads: Arc<Mutex<Reloads>>,
    /// The configuration's snapshots (none without a source).
    snapshots: Option<Snapshots>,
    source: Option<SourceHandle>,
    applied: watch::Sender<Arc<AppliedState>>,
    counters: Arc<CounterReader>,
    /// With `--announce-table`: the announcements, and how long a stop drains.
    announcements: Option<(announce::Announcer, Duration)>,
}

/// Start-up: everything up to the first apply. `None` when a stop signal ended it early (what
/// was made is in `setup`, to be taken down).
async fn start(
    settings: AttachSettings,
    roots: &Roots,
    setup: &mut Setup,
    stop: &mut StopSignals,
) -> anyhow::Result<Option<Running>> {
    let AttachSettings {
        iface,
        source,
        mode,
        options,
        metrics_addr,
        metrics_endpoints,
        stats_interval,
        keep_on_exit: _,
        conntrack_size,
        max_backends,
        announce_table,
        drain_period,
    } = settings;
    // Watch before the first read, so a change written while we start is not missed: it
    // triggers a reload that finds either a new state or nothing to do.
    let (handle, snapshots) = match &source {
        SourceSetting::File(path) => {
            let (source, snapshots) = FileSource::start(path, Settle::default())?;
            (Some(SourceHandle::File(source)), Some(snapshots))
        }
        SourceSetting::Api {
            kubeconfig,
            in_cluster,
        } => {
            let client = lb_userspace::api::client(kubeconfig.as_deref()).await?;
            let (parts, snapshots) = InCluster::start(&client, in_cluster, &options)?;
            (Some(SourceHandle::Api(Box::new(parts))), Some(snapshots))
        }
        SourceSetting::None => (None, None),
    };
    // A configuration file that does not validate stops us before anything changes. The API's
    // first state is awaited later, with the data plane attached: a node restarting beside a
    // serving data plane keeps serving while the API is listed (or away).
    let first = match &source {
        SourceSetting::File(path) => {
            let manifests = lb_userspace::manifest::load(path)?;
            First::Cluster(model::build(
                &manifests,
                &node_options(&options, &manifests),
            )?)
        }
        SourceSetting::Api { .. } => First::Api,
        SourceSetting::None => First::Nothing,
    };
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {metrics_addr}"))?;
    if setup.should_stop(stop).await {
        return Ok(None);
    }
    setup.touched = true;
    setup.paths.prepare(&roots.pin_root)?;
    // Before the data plane forwards anything. Not fatal: behind a node (the Kubernetes model)
    // replies leave by another interface than they came in on, and no redirect is sent.
    if let Err(e) = redirects::disable(&iface, &setup.paths.redirects_file) {
        warn!(error = %e, "could not turn ICMP redirects off: on a one-armed host, backends may be told to bypass the load balancer");
    }
    let state = AppliedState::read(&setup.paths.state_file)?;
    if state.generation > 0 {
        info!(
            generation = state.generation,
            services = state.services.len(),
            "adopting the state of the previous controller"
        );
    }
    let pin_dir = setup.paths.pin_dir.clone();
    let dataplane = setup
        .step(stop, "loading the data plane", move || {
            Dataplane::load_with(LoadOptions {
                conntrack_size,
                max_backends,
                pin_dir: Some(pin_dir),
            })
        })
        .await?
        .context("loading the data plane")?;
    setup.controller = Some(Controller::new(
        dataplane,
        state,
        Some(setup.paths.state_file.clone()),
        options.clone(),
    ));
    if setup.should_stop(stop).await {
        return Ok(None);
    }
    let mut controller = setup.controller.take().expect("just loaded");
    let (controller, attached) = setup
        .step(stop, "attaching", move || {
            let attached = controller.dataplane_mut().attach(&iface, mode);
            (controller, attached)
        })
        .await?;
    setup.controller = Some(controller);
    attached?;
    if let Some(controller) = &setup.controller {
        // Off the controller's loop: the sweep of quiet flows never delays an apply.
        conntrack::spawn_sweeper(conntrack::FlowTables::of(controller.dataplane())?);
    }
    let counters = Arc::new(
        setup
            .controller
            .as_ref()
            .expect("loaded")
            .dataplane()
            .counter_reader()
            .context("opening the counters")?,
    );
    let mut reloads = Reloads::default();
    // A stop that arrived before the data plane was complete (during the step that completes
    // it, too) finds it incomplete: --keep-on-exit keeps only whole data planes.
    let cluster = match first {
        First::Nothing => None,
        First::Cluster(cluster) => Some(cluster),
        First::Api => {
            let snapshots = snapshots
                .clone()
                .expect("the API source publishes snapshots");
            let controller = setup.controller.as_mut().expect("loaded");
            match first_api_state(snapshots, controller, &options, stop).await {
                Some(cluster) => Some(cluster),
                None => {
                    setup.stopped = true;
                    return Ok(None);
                }
            }
        }
    };
    match cluster {
        None => setup.complete = !setup.stopped,
        Some(cluster) => {
            if setup.should_stop(stop).await {
                return Ok(None);
            }
            log_warnings(&cluster);
            let mut controller = setup.controller.take().expect("loaded");
            let (controller, applied, took) = setup
                .step(stop, "the first apply", move || {
                    let started = std::time::Instant::now();
                    let applied = controller.apply(&cluster);
                    (controller, applied, started.elapsed())
                })
                .await?;
            setup.controller = Some(controller);
            reloads.applied(took, applied.is_ok());
            let report = applied?;
            if let Some(controller) = &setup.controller {
                controller.log_applied(&report);
            }
            setup.complete = !setup.stopped;
        }
    }
    if setup.should_stop(stop).await {
        return Ok(None);
    }

    let state = Arc::new(setup.controller.as_ref().expect("loaded").state().clone());
    let (applied, applied_rx) = watch::channel(state);
    let mut health = HealthChecks::default();
    health.sync(lb_userspace::health::wanted(
        &applied_rx.borrow().cluster,
        &options.node_name,
    ));
    tokio::spawn(follow_health_checks(
        health,
        applied_rx.clone(),
        options.node_name.clone(),
    ));
    let reloads = Arc::new(Mutex::new(reloads));
    // Announced once the data plane serves the first apply, and after every apply from then on.
    let announcements = match announce_table {
        Some(table) => Some((
            announce::Announcer::start(
                table,
                options.node_name.clone(),
                &setup.paths.state_file,
                applied_rx.clone(),
            )
            .await,
            drain_period,
        )),
        None => None,
    };
    info!(%metrics_addr, "serving Prometheus metrics on /metrics");
    tokio::spawn(serve_metrics(
        listener,
        MetricsSources {
            applied: applied_rx,
            counters: counters.clone(),
            reloads: reloads.clone(),
            endpoints: metrics_endpoints,
            announce: announcements.as_ref().map(|(a, _)| a.figures.clone()),
            in_cluster: match &handle {
                Some(SourceHandle::Api(parts)) => Some(parts.figures()),
                _ => None,
            },
        },
    ));
    // The one line that says start-up is over: the stop handlers exist, the metrics listener is
    // bound and answered by a running task, and the first apply is done. "applied" comes
    // earlier, before the metrics exist: whoever waits for the controller (tests, scripts)
    // waits for this line.
    info!("{READY_LINE}");
    Ok(Some(Running {
        options,
        stats_interval,
        reloads,
        snapshots,
        source: handle,
        applied,
        counters,
        announcements,
    }))
}

/// What the first apply applies.
enum First {
    /// Nothing: no source.
    Nothing,
    /// The configuration files' state, read and validated before anything changed.
    Cluster(Cluster),
    /// The API's first complete state, awaited once the data plane is attached.
    Api,
}

/// Waits for the API's first complete list (or a stop signal: `None`) and builds it, object
/// by object: an object the model refuses is logged and told to its Service, never a reason
/// to refuse the cluster (one bad Service must not keep a node from serving the others). The
/// snapshot is marked seen: the controller thread takes the ones after it.
async fn first_api_state(
    mut snapshots: Snapshots,
    controller: &mut Controller,
    options: &Options,
    stop: &mut StopSignals,
) -> Option<Cluster> {
    info!("waiting for the API's first complete list (a data plane found serving keeps serving)");
    let snapshot = tokio::select! {
        biased;
        () = stop.recv() => return None,
        snapshot = snapshots.wait_for(Option::is_some) => snapshot.ok()?.clone()?,
    };
    snapshots.mark_unchanged();
    let manifests = match &snapshot.manifests {
        Ok(manifests) => manifests,
        Err(e) => {
            error!(error = %e, "the API's first state cannot be read");
            return None;
        }
    };
    let outcome = model::build_and_project_each(
        manifests,
        &node_options(options, manifests),
        &controller.state().cluster,
    );
    for e in &outcome.refused {
        tell_rejection(controller, e);
        error!(error = %e, "configuration rejected for this object; the other objects go ahead");
    }
    Some(outcome.cluster)
}

impl Running {
    /// Hands `controller` to its thread, which applies the configuration's snapshots, and waits
    /// here for a stop signal (never for an apply); then stops the thread, once it finished
    /// what it was doing, and returns the controller (`None` if its thread panicked).
    async fn serve(
        self,
        controller: Controller,
        stop: &mut StopSignals,
        keep_on_exit: bool,
    ) -> Option<Controller> {
        let Self {
            options,
            stats_interval,
            reloads,
            snapshots,
            source,
            applied,
            counters,
            announcements,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let announcer = match &source {
            Some(SourceHandle::Api(parts)) => Some(parts.announcer()),
            _ => None,
        };
        let thread = ControllerThread {
            controller,
            options,
            outputs: Outputs { reloads, applied },
            announcer,
            snapshots,
            stop: stop_rx,
            runtime: tokio::runtime::Handle::current(),
        };
        let thread = std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || thread.run());
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                error!(error = %e, "starting the controller thread");
                return None;
            }
        };
        let mut ticker = tokio::time::interval(Duration::from_secs(stats_interval.max(1)));
        loop {
            tokio::select! {
                () = stop.recv() => break,
                _ = ticker.tick(), if stats_interval > 0 => log_counters(counters.reason_counters()),
            }
        }
        // With --keep-on-exit the data plane keeps serving, and its announcements stay.
        if let (Some((announcements, drain)), false) = (announcements, keep_on_exit) {
            announce::drain(announcements, drain, stop.recv()).await;
        }
        info!("stopping");
        let _ = stop_tx.send(true);
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        // The lease given up at once, so another node takes over now rather than after the
        // lease duration (the data plane's own fate, kept or removed, is decided after).
        if let Some(SourceHandle::Api(parts)) = source {
            let InCluster { leadership, .. } = *parts;
            leadership.release().await;
        }
        match joined {
            Ok(Ok(controller)) => Some(controller),
            _ => {
                error!("the controller thread panicked");
                None
            }
        }
    }
}

/// The one thread that owns the data plane: it applies the latest snapshot of the
/// configuration, retries a failed apply with backoff, and looks for local pods between
/// applies; it publishes the applied state after every change of it. Nothing else waits for it.
struct ControllerThread {
    controller: Controller,
    options: Options,
    outputs: Outputs,
    /// Tells refusals to the API, when following it.
    announcer: Option<RefusalAnnouncer>,
    snapshots: Option<Snapshots>,
    stop: watch::Receiver<bool>,
    /// Its waits (for a snapshot, a retry, a stop) are the runtime's timers and channels.
    runtime: tokio::runtime::Handle,
}

/// What woke the controller thread.
enum Wake {
    Stop,
    Snapshot,
    Retry,
    LocalPods,
}

impl ControllerThread {
    fn run(mut self) -> Controller {
        // A desired state whose apply failed, tried again at `retry_at`.
        let mut pending: Option<(Cluster, Duration, Instant)> = None;
        let mut local_pods_at = Instant::now() + LOCAL_PODS_REFRESH;
        loop {
            let retry_at = pending.as_ref().map(|(_, _, at)| *at);
            let Self {
                snapshots,
                stop,
                runtime,
                ..
            } = &mut self;
            let wake = runtime.block_on(async {
                let snapshot = async {
                    if let Some(snapshots) = snapshots
                        && snapshots.changed().await.is_ok()
                    {
                        return;
                    }
                    // No source, or it is gone: nothing more to wait for from it.
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|stop| *stop) => Wake::Stop,
                    () = snapshot => Wake::Snapshot,
                    () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => Wake::Retry,
                    () = tokio::time::sleep_until(local_pods_at) => Wake::LocalPods,
                }
            });
            match wake {
                Wake::Stop => break,
                Wake::Snapshot => {
                    let Some(snapshot) = self
                        .snapshots
                        .as_mut()
                        .and_then(|s| s.borrow_and_update().clone())
                    else {
                        continue;
                    };
                    // The latest snapshot replaces whatever was waiting to be tried again.
                    pending = reload(
                        &mut self.controller,
                        &snapshot.manifests,
                        &self.options,
                        &self.outputs,
                        self.announcer.as_ref(),
                    )
                    .map(|cluster| retry_later(cluster, RETRY_FIRST));
                }
                Wake::Retry => {
                    let (cluster, wait, _) = pending.take().expect("a retry is pending");
                    lock(&self.outputs.reloads).retried();
                    if !apply_desired(&mut self.controller, &cluster, &self.outputs) {
                        pending = Some(retry_later(cluster, (wait * 2).min(RETRY_MAX)));
                    }
                }
                Wake::LocalPods => {
                    local_pods_at = Instant::now() + LOCAL_PODS_REFRESH;
                    if let Err(e) = self.controller.refresh_local_pods() {
                        warn!(error = %e, "saving the local pods found");
                    }
                    // Applies and rejections publish their own state, before the lines that
                    // say they happened.
                    self.outputs.publish(self.controller.state());
                }
            }
        }
        self.controller
    }
}

/// Where the controller thread reports: the reload figures, and the applied state.
struct Outputs {
    reloads: Arc<Mutex<Reloads>>,
    applied: watch::Sender<Arc<AppliedState>>,
}

impl Outputs {
    /// Publishes `state`, if it changed since last published.
    fn publish(&self, state: &AppliedState) {
        self.applied.send_if_modified(|published| {
            if **published == *state {
                return false;
            }
            *published = Arc::new(state.clone());
            true
        });
    }

    fn reloads(&self) -> std::sync::MutexGuard<'_, Reloads> {
        lock(&self.reloads)
    }
}

/// `cluster`, to be tried again after `wait`.
fn retry_later(cluster: Cluster, wait: Duration) -> (Cluster, Duration, Instant) {
    warn!(
        retry_in_ms = wait.as_millis() as u64,
        "the apply failed: trying again"
    );
    (cluster, wait, Instant::now() + wait)
}

fn lock(reloads: &Mutex<Reloads>) -> std::sync::MutexGuard<'_, Reloads> {
    reloads.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the health check node ports as the applied state asks, until the controller thread
/// is gone.
async fn follow_health_checks(mut health: HealthChecks, mut applied: Applied, node_name: String) {
    while applied.changed().await.is_ok() {
        let wanted = lb_userspace::health::wanted(&applied.borrow_and_update().cluster, &node_name);
        health.sync(wanted);
    }
}

fn log_warnings(cluster: &Cluster) {
    for warning in &cluster.warnings {
        warn!("{warning}");
    }
}

/// `options` with this host's current addresses (they can change while we run), and, unless
/// `--node-ip` named them, the node addresses of this node's Node object in `manifests` (the
/// API's, or a file's).
fn node_options(options: &Options, manifests: &Manifests) -> Options {
    let mut options = options.clone();
    options.host_addresses = lb_userspace::host::addresses();
    if options.node_ips.is_empty()
        && let Some(node) = manifests
            .nodes
            .iter()
            .find(|n| n.object.metadata.name.as_deref() == Some(options.node_name.as_str()))
    {
        options.node_ips = lb_userspace::api::node_addresses(&node.object);
    }
    options.excluded_from_load_balancers = manifests.nodes.iter().any(|n| {
        n.object.metadata.name.as_deref() == Some(options.node_name.as_str())
            && announce::excluded(&n.object)
    });
    options
}

/// Applies a snapshot of the configuration, object by object: a refused object is logged and
/// told to its Service, whose previous version keeps serving, and the other objects go ahead (a
/// reload with a refused object counts as failed: `lb_config_last_reload_successful` 0). The
/// desired state is applied unless it is the one applied already (a no-op writes nothing).
/// Returns the desired state when its apply failed, to be tried again.
fn reload(
    controller: &mut Controller,
    manifests: &Result<Manifests, ConfigError>,
    options: &Options,
    outputs: &Outputs,
    announcer: Option<&RefusalAnnouncer>,
) -> Option<Cluster> {
    let built = match manifests {
        Ok(manifests) => Ok(model::build_and_project_each(
            manifests,
            &node_options(options, manifests),
            &controller.state().cluster,
        )),
        Err(e) => Err(e.clone()),
    };
    let outcome = match built {
        Ok(outcome) => outcome,
        Err(e) => {
            outputs.reloads().rejected();
            tell_rejection(controller, &e);
            outputs.publish(controller.state());
            error!(error = %e, "configuration rejected; the previous state keeps serving");
            return None;
        }
    };
    for e in &outcome.refused {
        tell_rejection(controller, e);
        if let Some(announcer) = announcer {
            announcer.announce(e);
        }
        error!(error = %e, "configuration rejected for this object; its Service keeps its previous state, the other objects go ahead");
    }
    if !outcome.refused.is_empty() {
        outputs.publish(controller.state());
    }
    let refused_some = !outcome.refused.is_empty();
    let cluster = outcome.cluster;
    if cluster == controller.state().cluster {
        if refused_some {
            outputs.reloads().rejected();
        } else {
            outputs.reloads().unchanged();
        }
        info!(
            generation = controller.state().generation,
            "configuration unchanged: nothing to apply"
        );
        return None;
    }
    let applied = apply_desired(controller, &cluster, outputs);
    if refused_some {
        outputs.reloads().rejected();
    }
    (!applied).then_some(cluster)
}

/// Applies `cluster`; whether it succeeded. The "applied" line comes once the new state is
/// published and counted, so whoever reads the metrics after it sees the apply.
fn apply_desired(controller: &mut Controller, cluster: &Cluster, outputs: &Outputs) -> bool {
    log_warnings(cluster);
    info!(services = cluster.services.len(), "applying");
    let started = std::time::Instant::now();
    let applied = controller.apply(cluster);
    outputs
        .reloads()
        .applied(started.elapsed(), applied.is_ok());
    match applied {
        Ok(report) => {
            outputs.publish(controller.state());
            controller.log_applied(&report);
            true
        }
        Err(e) => {
            error!(error = %e, "applying the configuration failed");
            false
        }
    }
}

/// Tells a rejection to the Service it concerns, as a `Warning` event `describe` shows (saved
/// before the log line, which whoever waits for the rejection waits for).
fn tell_rejection(controller: &mut Controller, e: &lb_userspace::manifest::ConfigError) {
    let services = controller
        .state()
        .cluster
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str()));
    if let Some(event) = ServiceEvent::rejected(e, services, now_timestamp())
        && let Err(e) = controller.record_event(event)
    {
        warn!(error = %e, "saving the rejection's event");
    }
}

/// What `/metrics` reads: published snapshots and readers of their own, never the controller.
struct MetricsSources {
    applied: Applied,
    counters: Arc<CounterReader>,
    reloads: Arc<Mutex<Reloads>>,
    endpoints: bool,
    /// The announcements' figures, with `--announce-table`.
    announce: Option<Arc<announce::Figures>>,
    /// What following the API adds (`None` for files).
    in_cluster: Option<InClusterFigures>,
}

/// Reads the figures of the API source, the lease and the address assignment.
type InClusterFigures = Arc<dyn Fn() -> metrics::InCluster + Send + Sync>;

/// Serves `/metrics`, and `/healthz` and `/readyz` for probes. The listener is served only once
/// start-up is over (the first apply done, the data plane attached), so both probes answer 200
/// from then on: a process that answers is alive and serving.
/// A probe's answer: `answer` while the controller thread runs, 503 once it is gone.
fn probe_answer(running: bool, answer: &'static str) -> (axum::http::StatusCode, &'static str) {
    if running {
        (axum::http::StatusCode::OK, answer)
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the controller thread stopped\n",
        )
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, sources: MetricsSources) {
    let sources = Arc::new(sources);
    // Alive and ready while the controller thread is: once it is gone (its publisher dropped,
    // a panic), nothing applies the configuration any more and the probes say so, so that a
    // kubelet restarts the pod.
    let probe = |answer: &'static str| {
        let sources = sources.clone();
        move || {
            let running = sources.applied.has_changed().is_ok();
            async move { probe_answer(running, answer) }
        }
    };
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(probe("ok\n")))
        .route("/readyz", axum::routing::get(probe("ready\n")))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let sources = sources.clone();
                async move {
                    let state = sources.applied.borrow().clone();
                    let reloads = lock(&sources.reloads).clone();
                    // One system call per counter: off the runtime's threads.
                    let render = tokio::task::spawn_blocking(move || {
                        let in_cluster = sources.in_cluster.as_ref().map(|figures| figures());
                        metrics::render(
                            &state,
                            &sources.counters,
                            &reloads,
                            sources.endpoints,
                            sources.announce.as_deref(),
                            in_cluster.as_ref(),
                        )
                    });
                    let body = render.await.unwrap_or_default();
                    (
                        [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                        body,
                    )
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        error!(error = %e, "the metrics server stopped");
    }
}

fn detach(iface: &str, roots: &Roots) -> anyhow::Result<()> {
    let paths = Paths::new(&roots.pin_root, &roots.state_root, iface);
    announce::withdraw_recorded(&paths.state_file)
        .context("withdrawing the announced addresses")?;
    let removed = Dataplane::unpin_all(&paths.pin_dir)
        .with_context(|| format!("removing {}", paths.pin_dir.display()))?;
    let state_removed = std::fs::remove_file(&paths.state_file).is_ok();
    let redirects_restored = redirects::restore(&paths.redirects_file)
        .context("putting the ICMP redirect settings back")?;
    if removed.is_empty() && !state_removed && !redirects_restored {
        anyhow::bail!(
            "nothing is attached to {iface} under {}",
            roots.pin_root.display()
        );
    }
    println!(
        "detached {iface}: removed {} pins{}{}; a controller still running for it keeps it attached until it exits",
        removed.len(),
        if state_removed { " and the state" } else { "" },
        if redirects_restored {
            "; ICMP redirect settings put back"
        } else {
            ""
        }
    );
    Ok(())
}

fn log_counters(counters: Result<Vec<(Reason, Counter)>, DataplaneError>) {
    match counters {
        Ok(counters) => {
            for (reason, counter) in counters {
                if counter.packets > 0 {
                    info!(
                        reason = reason.name(),
                        packets = counter.packets,
                        bytes = counter.bytes,
                        "counter"
                    );
                }
            }
        }
        Err(e) => warn!(error = %e, "reading the counters"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_fail_once_the_controller_thread_is_gone() {
        let (publisher, applied) = watch::channel(Arc::new(AppliedState::default()));
        assert!(applied.has_changed().is_ok());
        assert_eq!(probe_answer(applied.has_changed().is_ok(), "ok\n").0, 200);
        drop(publisher);
        assert_eq!(
            probe_answer(applied.has_changed().is_ok(), "ok\n"),
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the controller thread stopped\n"
            )
        );
    }
}
