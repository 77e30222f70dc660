//! Loading, attaching, programming and reading the kernel side.
//!
//! Attach points of `attach(IFACE)`: XDP on IFACE's ingress does DNAT of VIP traffic; a TC
//! (tcx) program on IFACE's egress does the reverse NAT of replies. Replies from backends reach
//! IFACE's egress whether the backends sit behind the host (the Kubernetes node model: the
//! kernel routes them from the pod interfaces to IFACE) or on IFACE's own segment (a one-armed
//! host: the kernel routes them back out of IFACE), so one pair of attach points serves both.
//!
//! Local pods get a faster path on top ([`Dataplane::attach_pod_interface`], see
//! `lb-ebpf/src/pods.rs`): a TC program on IFACE's ingress moves the frames XDP DNATed for them
//! into their namespaces, and one on each pod's host-side interface sends their replies
//! straight to IFACE, both past the host's IP stack.

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError, PerCpuArray,
        lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Counter, Event, FlowCounter, FlowKey,
    FlowValue, Reason, ReverseValue, ServiceKey, ServiceValue, SourceRangeKey, TunnelConfig,
    maps::{
        BACKEND_F_VALID, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, MAGLEV_MAX_SIZE,
        MAGLEV_TABLE_FLAGS, VIP_FILTER_WORDS, addr16, lru_entries_for, names, source_range_key_of,
        source_range_of, vip_filter_bit,
    },
};
use tracing::{info, warn};

use crate::maglev::MaglevTable;

/// The `lb-ebpf` object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark programs (`lb-ebpf/src/bench.rs`): a live-frame generator, a counting sink and
/// the minimal DNAT forwarder. Embedded for `cargo xtask bench`; the load balancer never loads
/// them.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

/// Name of the XDP (ingress, DNAT) entry point.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// Name of the TC (egress, reverse NAT) entry point.
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
/// Name of the TC entry point on IFACE's ingress that moves frames into local pods.
pub const TC_INGRESS_PROGRAM: &str = "lb_tc_ingress";
/// Name of the TC entry point on a local pod's host-side interface (its replies).
pub const TC_POD_PROGRAM: &str = "lb_tc_pod";
const TC_PROGRAMS: [&str; 3] = [TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM, TC_POD_PROGRAM];
/// Name of the minimal XDP_PASS program (baseline, and veth peers that take redirected frames).
pub const XDP_PASS_PROGRAM: &str = "lb_xdp_pass";

/// Errors of loading, attaching, programming and reading the data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The binary was built with `AYA_BUILD_SKIP` and has no kernel object.
    #[error(
        "this binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it without that variable"
    )]
    NoObject,
    /// The kernel refused the object or one of its maps.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    /// The object lacks a program or map this controller expects.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The missing item's name.
        name: &'static str,
    },
    /// Loading, attaching or detaching a program failed.
    #[error("{action} {program} on {iface}: {source}")]
    Program {
        /// What was being done.
        action: &'static str,
        /// The program's name.
        program: &'static str,
        /// The interface concerned.
        iface: String,
        /// The underlying error (boxed: it is large and errors travel by value).
        source: Box<ProgramError>,
    },
    /// Reading or writing a map failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The underlying error.
        source: MapError,
    },
    /// Adding a redirect target failed.
    #[error("adding interface {ifindex} to TX_PORTS: {source}")]
    TxPort {
        /// The interface index.
        ifindex: u32,
        /// The underlying error.
        source: aya::maps::xdp::XdpMapError,
    },
    /// An interface named to the data plane does not exist (here).
    #[error("interface {iface}: {source}")]
    Interface {
        /// The interface's name.
        iface: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Pinning, adopting or unpinning failed.
    #[error("{what}: {source}")]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A Maglev table was empty or larger than the data plane takes.
    #[error("a Maglev table of {0} slots: tables have 1 to {MAGLEV_MAX_SIZE} slots")]
    TableSize(usize),
    /// A source range's prefix is longer than its family's addresses.
    #[error("source range {addr}/{len}: the prefix is longer than the address")]
    SourceRange {
        /// The range's address.
        addr: IpAddr,
        /// Its prefix length.
        len: u8,
    },
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode if the driver lacks XDP support.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// Choices made at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Live flows the connection table and the reverse-NAT table keep, however many come and
    /// go (the maps get room for the kernel LRU's per-CPU free lists on top).
    pub conntrack_size: u32,
    /// Backend ids the data plane has room for (the backends array and the per-CPU backend
    /// counters). A pinned data plane keeps the capacity it was created with.
    pub max_backends: u32,
    /// A bpffs folder where the maps (and, once attached, the links) are pinned. Maps already
    /// pinned there are reused: a restarted controller adopts the running data plane and its
    /// flows.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_size: DEFAULT_CONNTRACK_SIZE,
            max_backends: DEFAULT_MAX_BACKENDS,
            pin_dir: None,
        }
    }
}

/// Maps that outlive the controller when pinned: the data plane's whole state.
pub const PINNED_MAPS: &[&str] = &[
    names::SERVICES,
    names::VIP_ADDRS,
    names::VIP_FILTER,
    names::MAGLEV,
    names::BACKENDS,
    names::CONNTRACK,
    names::REVERSE_NAT,
    names::AFFINITY,
    names::TX_PORTS,
    names::POD_PORTS,
    names::SOURCE_RANGES,
    names::STATS,
    names::EVENTS,
    names::SERVICE_STATS,
    names::BACKEND_STATS,
    names::BACKEND_IDS,
    names::TUNNEL,
    names::TUNNEL_PEERS,
];

/// File names of the pinned links in a pin folder.
const XDP_LINK_PIN: &str = "link_xdp";
const TC_LINK_PIN: &str = "link_tc_egress";
const TC_INGRESS_LINK_PIN: &str = "link_tc_ingress";

/// The pin file of a TC program's link on IFACE.
fn tc_link_pin(program: &str) -> &'static str {
    if program == TC_INGRESS_PROGRAM {
        TC_INGRESS_LINK_PIN
    } else {
        TC_LINK_PIN
    }
}

enum Link {
    Xdp(&'static str, XdpLinkId),
    Tc(&'static str, SchedClassifierLinkId),
}

/// A local pod's host-side interface with the reply program attached.
struct PodInterface {
    ifindex: u32,
    link: SchedClassifierLinkId,
}

/// The loaded kernel programs and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<(String, Link)>,
    /// Local pods' interfaces by name. Their links are not pinned: they go with this process,
    /// and their pods' replies with them to the host's stack, until a controller attaches
    /// them again.
    pod_interfaces: std::collections::BTreeMap<String, PodInterface>,
    pin_dir: Option<PathBuf>,
    /// The VIP filter's words as last written or read (read on first use: a pinned filter
    /// holds what an earlier controller wrote).
    vip_filter: Option<Vec<u64>>,
    /// Room in the backends array, as created (a pinned one keeps its own).
    max_backends: u32,
    /// The source-range trie's keys by service id, as last written or read (read on first
    /// use: a pinned trie holds what an earlier controller wrote), so that a service's old
    /// ranges are known without walking the whole trie.
    source_ranges: Option<BTreeMap<u32, BTreeSet<SourceRangeKey>>>,
}

impl Dataplane {
    /// Loads the embedded object with default sizes.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(LoadOptions::default())
    }

    /// Loads the embedded object into the kernel and verifies its programs.
    pub fn load_with(options: LoadOptions) -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        // Room for the LRU's per-CPU free lists on top, so `conntrack_size` live flows fit.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
        let entries = lru_entries_for(options.conntrack_size, cpus);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::CONNTRACK, entries)
            .map_max_entries(names::REVERSE_NAT, entries)
            .map_max_entries(names::BACKENDS, options.max_backends)
            .map_max_entries(names::BACKEND_IDS, options.max_backends)
            .map_max_entries(names::BACKEND_STATS, options.max_backends);
        if let Some(dir) = &options.pin_dir {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let load_error = |program| {
            move |source| DataplaneError::Program {
                action: "loading",
                program,
                iface: "(none)".into(),
                source: Box::new(source),
            }
        };
        for name in [XDP_PROGRAM, XDP_PASS_PROGRAM] {
            xdp_mut(&mut ebpf, name)?.load().map_err(load_error(name))?;
        }
        for name in TC_PROGRAMS {
            tc_mut(&mut ebpf, name)?.load().map_err(load_error(name))?;
        }
        let name = names::BACKENDS;
        let max_backends = match ebpf.map(name) {
            Some(Map::Array(data)) => data.info().map_err(map_error(name))?.max_entries(),
            _ => {
                return Err(DataplaneError::Missing {
                    kind: "array",
                    name,
                });
            }
        };
        if max_backends != options.max_backends {
            warn!(
                requested = options.max_backends,
                pinned = max_backends,
                "the pinned data plane keeps its backend capacity; detach to change it"
            );
        }
        let mut dataplane = Self {
            ebpf,
            attached: Vec::new(),
            pod_interfaces: std::collections::BTreeMap::new(),
            pin_dir: options.pin_dir,
            vip_filter: None,
            max_backends,
            source_ranges: None,
        };
        dataplane.allow_adopted_vips()?;
        Ok(dataplane)
    }

    /// Backend ids this data plane has room for: `0..max_backends()`.
    pub fn max_backends(&self) -> u32 {
        self.max_backends
    }

    /// The DNAT XDP program, for running packets through it with [`aya::programs::TestRun`].
    pub fn xdp_program(&self) -> Result<&Xdp, DataplaneError> {
        self.xdp(XDP_PROGRAM)
    }

    /// The minimal XDP_PASS program.
    pub fn xdp_pass_program(&self) -> Result<&Xdp, DataplaneError> {
        self.xdp(XDP_PASS_PROGRAM)
    }

    /// The reverse-NAT TC program.
    pub fn tc_egress_program(&self) -> Result<&SchedClassifier, DataplaneError> {
        self.tc(TC_EGRESS_PROGRAM)
    }

    /// The TC program of local pods' interfaces.
    pub fn tc_pod_program(&self) -> Result<&SchedClassifier, DataplaneError> {
        self.tc(TC_POD_PROGRAM)
    }

    fn tc(&self, name: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        self.ebpf
            .program(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(DataplaneError::Missing {
                kind: "program",
                name,
            })
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(DataplaneError::Missing {
                kind: "program",
                name,
            })
    }

    /// Attaches DNAT (XDP ingress), the hand-off to local pods (TC ingress) and reverse NAT (TC
    /// egress) to `iface`; returns the XDP mode the kernel accepted.
    ///
    /// With a pin folder, links pinned there by an earlier controller are adopted: their
    /// programs are replaced atomically by these, so traffic never stops. New links are pinned,
    /// so the data plane keeps serving if this process dies.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<XdpMode, DataplaneError> {
        if let Some(dir) = self.pin_dir.clone()
            && dir.join(XDP_LINK_PIN).exists()
            && dir.join(TC_LINK_PIN).exists()
        {
            return self.adopt(iface, &dir);
        }
        let used = self.attach_xdp(iface, XDP_PROGRAM, mode)?;
        self.attach_tc(iface, TC_EGRESS_PROGRAM, TcAttachType::Egress)?;
        self.attach_tc(iface, TC_INGRESS_PROGRAM, TcAttachType::Ingress)?;
        if let Some(dir) = self.pin_dir.clone() {
            self.pin_links(&dir)?;
        }
        Ok(used)
    }

    /// Replaces the programs of the links pinned in `dir` with this instance's.
    fn adopt(&mut self, iface: &str, dir: &Path) -> Result<XdpMode, DataplaneError> {
        let pin_error =
            |what: &'static str| move |source: std::io::Error| DataplaneError::Pin { what, source };
        let xdp_link = PinnedLink::from_pin(dir.join(XDP_LINK_PIN))
            .map_err(|e| pin_error("opening the pinned XDP link")(std::io::Error::other(e)))?;
        let xdp_link = XdpLink::try_from(FdLink::from(xdp_link))
            .map_err(|e| pin_error("reading the pinned XDP link")(std::io::Error::other(e)))?;
        let link = xdp_mut(&mut self.ebpf, XDP_PROGRAM)?
            .attach_to_link(xdp_link)
            .map_err(|source| DataplaneError::Program {
                action: "adopting the XDP link with",
                program: XDP_PROGRAM,
                iface: iface.to_owned(),
                source: Box::new(source),
            })?;
        self.attached
            .push((iface.to_owned(), Link::Xdp(XDP_PROGRAM, link)));
        self.adopt_tc(iface, dir, TC_EGRESS_PROGRAM)?;
        if dir.join(TC_INGRESS_LINK_PIN).exists() {
            self.adopt_tc(iface, dir, TC_INGRESS_PROGRAM)?;
        } else {
            // A data plane pinned by a version without it: attached now, pinned beside.
            self.attach_tc(iface, TC_INGRESS_PROGRAM, TcAttachType::Ingress)?;
            self.pin_links(dir)?;
        }
        info!(%iface, dir = %dir.display(), "adopted the pinned data plane: programs replaced in place");
        Ok(XdpMode::Default)
    }

    /// Replaces the program of the TC link pinned in `dir` for program `name` with this
    /// instance's.
    fn adopt_tc(
        &mut self,
        iface: &str,
        dir: &Path,
        name: &'static str,
    ) -> Result<(), DataplaneError> {
        let pin_error = |what: &'static str| {
            move |e: String| DataplaneError::Pin {
                what,
                source: std::io::Error::other(e),
            }
        };
        let pinned = PinnedLink::from_pin(dir.join(tc_link_pin(name)))
            .map_err(|e| pin_error("opening a pinned TC link")(e.to_string()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .map_err(|e| pin_error("reading a pinned TC link")(e.to_string()))?;
        let link = tc_mut(&mut self.ebpf, name)?
            .attach_to_link(link)
            .map_err(|source| DataplaneError::Program {
                action: "adopting the TC link with",
                program: name,
                iface: iface.to_owned(),
                source: Box::new(source),
            })?;
        self.attached.push((iface.to_owned(), Link::Tc(name, link)));
        Ok(())
    }

    /// Pins the XDP and TC links just attached (those not pinned yet), so they outlive this
    /// process.
    fn pin_links(&mut self, dir: &Path) -> Result<(), DataplaneError> {
        let pin_error = |what: &'static str| {
            move |e: String| DataplaneError::Pin {
                what,
                source: std::io::Error::other(e),
            }
        };
        for (iface, link) in std::mem::take(&mut self.attached) {
            match link {
                Link::Xdp(name, id) => {
                    if dir.join(XDP_LINK_PIN).exists() {
                        // Adopted, so pinned already.
                        self.attached.push((iface, Link::Xdp(name, id)));
                        continue;
                    }
                    let program = xdp_mut(&mut self.ebpf, name)?;
                    let owned = program
                        .take_link(id)
                        .map_err(|e| pin_error("taking the XDP link")(e.to_string()))?;
                    let fd_link = FdLink::try_from(owned).map_err(|e| {
                        pin_error("pinning the XDP link (attached through netlink, which cannot be pinned)")(e.to_string())
                    })?;
                    let pinned = fd_link
                        .pin(dir.join(XDP_LINK_PIN))
                        .map_err(|e| pin_error("pinning the XDP link")(e.to_string()))?;
                    let link = XdpLink::try_from(FdLink::from(pinned))
                        .map_err(|e| pin_error("reopening the XDP link")(e.to_string()))?;
                    let id = xdp_mut(&mut self.ebpf, name)?
                        .attach_to_link(link)
                        .map_err(|e| pin_error("keeping the XDP link")(e.to_string()))?;
                    self.attached.push((iface, Link::Xdp(name, id)));
                }
                Link::Tc(name, id) => {
                    let pin = dir.join(tc_link_pin(name));
                    if pin.exists() {
                        // Adopted, so pinned already.
                        self.attached.push((iface, Link::Tc(name, id)));
                        continue;
                    }
                    let program = tc_mut(&mut self.ebpf, name)?;
                    let owned = program
                        .take_link(id)
                        .map_err(|e| pin_error("taking the TC link")(e.to_string()))?;
                    let fd_link = FdLink::try_from(owned)
                        .map_err(|e| pin_error("pinning the TC link")(e.to_string()))?;
                    let pinned = fd_link
                        .pin(pin)
                        .map_err(|e| pin_error("pinning the TC link")(e.to_string()))?;
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| pin_error("reopening the TC link")(e.to_string()))?;
                    let id = tc_mut(&mut self.ebpf, name)?
                        .attach_to_link(link)
                        .map_err(|e| pin_error("keeping the TC link")(e.to_string()))?;
                    self.attached.push((iface, Link::Tc(name, id)));
                }
            }
        }
        Ok(())
    }

    /// Removes the pinned links, maps and state under `dir`: the programs detach as soon as no
    /// process holds their links. Returns the files removed.
    pub fn unpin_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        if !dir.exists() {
            return Ok(removed);
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
        std::fs::remove_dir(dir)?;
        Ok(removed)
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        name: &'static str,
        direction: TcAttachType,
    ) -> Result<(), DataplaneError> {
        let link = self.attach_tc_link(iface, name, direction)?;
        info!(%iface, program = name, "TC program attached");
        self.attached.push((iface.to_owned(), Link::Tc(name, link)));
        Ok(())
    }

    fn attach_tc_link(
        &mut self,
        iface: &str,
        name: &'static str,
        direction: TcAttachType,
    ) -> Result<SchedClassifierLinkId, DataplaneError> {
        tc_mut(&mut self.ebpf, name)?
            .attach(iface, direction)
            .map_err(|source| DataplaneError::Program {
                action: "attaching",
                program: name,
                iface: iface.to_owned(),
                source: Box::new(source),
            })
    }

    /// Takes the local pod behind `iface` (its host-side interface: a veth whose peer is in
    /// the pod's namespace) onto the fast path: frames DNATed for it are moved into its
    /// namespace, and its replies are reverse-NATed at `iface`'s ingress and sent straight to
    /// the client-facing interface. Idempotent; an interface recreated under the same name is
    /// taken on afresh. Call it in the namespace of `iface`.
    pub fn attach_pod_interface(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let ifindex =
            nix::net::if_::if_nametoindex(iface).map_err(|errno| DataplaneError::Interface {
                iface: iface.to_owned(),
                source: errno.into(),
            })?;
        match self.pod_interfaces.get(iface) {
            Some(attached) if attached.ifindex == ifindex => return Ok(()),
            // The same name on a new interface (its pod's sandbox recreated it).
            Some(_) => self.detach_pod_interface(iface)?,
            None => {}
        }
        // The reply program first: frames must not reach the pod before its replies can be
        // taken over (they would still be correct, only slower).
        let link = self.attach_tc_link(iface, TC_POD_PROGRAM, TcAttachType::Ingress)?;
        let name = names::POD_PORTS;
        let added = HashMap::<_, u32, u32>::try_from(self.map_mut(name)?)
            .map_err(map_error(name))
            .and_then(|mut ports| ports.insert(ifindex, 0, 0).map_err(map_error(name)));
        if let Err(e) = added {
            let _ = tc_mut(&mut self.ebpf, TC_POD_PROGRAM)?.detach(link);
            return Err(e);
        }
        info!(%iface, ifindex, "local pod interface on the fast path");
        self.pod_interfaces
            .insert(iface.to_owned(), PodInterface { ifindex, link });
        Ok(())
    }

    /// Takes a local pod's interface off the fast path (see [`Self::attach_pod_interface`]).
    /// An interface that is gone already (its pod deleted) is forgotten without complaint.
    pub fn detach_pod_interface(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let Some(pod) = self.pod_interfaces.remove(iface) else {
            return Ok(());
        };
        let name = names::POD_PORTS;
        let mut ports: HashMap<_, u32, u32> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        match ports.remove(&pod.ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(DataplaneError::Map { name, source }),
        }
        // Fails when the interface is gone, which detached the link with it.
        let _ = tc_mut(&mut self.ebpf, TC_POD_PROGRAM)?.detach(pod.link);
        info!(%iface, "local pod interface off the fast path");
        Ok(())
    }

    /// The interfaces the load balancer is attached to (client-facing).
    pub fn attached_interfaces(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|(iface, _)| iface.as_str())
    }

    /// The local pods' interfaces on the fast path.
    pub fn pod_interfaces(&self) -> impl Iterator<Item = &str> {
        self.pod_interfaces.keys().map(String::as_str)
    }

    /// Attaches the minimal XDP_PASS program to `iface`: a veth whose peer redirects into it
    /// needs an XDP program to take the frames.
    pub fn attach_pass(&mut self, iface: &str) -> Result<XdpMode, DataplaneError> {
        self.attach_xdp(iface, XDP_PASS_PROGRAM, AttachMode::Native)
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        name: &'static str,
        mode: AttachMode,
    ) -> Result<XdpMode, DataplaneError> {
        let program = xdp_mut(&mut self.ebpf, name)?;
        let attach = |program: &mut Xdp, mode| {
            program
                .attach(iface, mode)
                .map_err(|source| DataplaneError::Program {
                    action: "attaching",
                    program: name,
                    iface: iface.to_owned(),
                    source: Box::new(source),
                })
        };
        let (link, used) = match mode {
            AttachMode::Native => (attach(program, XdpMode::Driver)?, XdpMode::Driver),
            AttachMode::Generic => (attach(program, XdpMode::Skb)?, XdpMode::Skb),
            AttachMode::Auto => match attach(program, XdpMode::Driver) {
                Ok(link) => (link, XdpMode::Driver),
                Err(native_error) => {
                    warn!(%iface, error = %native_error, "native XDP refused, falling back to generic (skb) mode");
                    (attach(program, XdpMode::Skb)?, XdpMode::Skb)
                }
            },
        };
        info!(%iface, program = name, mode = mode_name(used), "XDP program attached");
        self.attached
            .push((iface.to_owned(), Link::Xdp(name, link)));
        Ok(used)
    }

    /// Detaches every program from every interface it was attached to.
    pub fn detach_all(&mut self) -> Result<(), DataplaneError> {
        let pods: Vec<String> = self.pod_interfaces.keys().cloned().collect();
        for iface in pods {
            self.detach_pod_interface(&iface)?;
        }
        for (iface, link) in std::mem::take(&mut self.attached) {
            let detach_error = |program| {
                let iface = iface.clone();
                move |source| DataplaneError::Program {
                    action: "detaching",
                    program,
                    iface,
                    source: Box::new(source),
                }
            };
            match link {
                Link::Xdp(name, link) => xdp_mut(&mut self.ebpf, name)?
                    .detach(link)
                    .map_err(detach_error(name))?,
                Link::Tc(name, link) => tc_mut(&mut self.ebpf, name)?
                    .detach(link)
                    .map_err(detach_error(name))?,
            }
            info!(%iface, "link detached");
        }
        Ok(())
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Missing { kind: "map", name })
    }

    fn map(&self, name: &'static str) -> Result<&Map, DataplaneError> {
        self.ebpf
            .map(name)
            .ok_or(DataplaneError::Missing { kind: "map", name })
    }

    /// The file descriptor of the hash map or array `name`, for system calls aya 0.14 does not
    /// offer (batch reads).
    pub fn map_fd(
        &self,
        name: &'static str,
    ) -> Result<std::os::fd::BorrowedFd<'_>, DataplaneError> {
        use std::os::fd::AsFd as _;
        match self.map(name)? {
            Map::HashMap(data) | Map::LruHashMap(data) | Map::Array(data) => Ok(data.fd().as_fd()),
            _ => Err(DataplaneError::Missing {
                kind: "hash map or array",
                name,
            }),
        }
    }

    /// Adds or replaces a service.
    pub fn set_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        let name = names::SERVICES;
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.insert(key, value, 0).map_err(map_error(name))
    }

    /// Removes a service.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        let name = names::SERVICES;
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.remove(key).map_err(map_error(name))
    }

    /// Records that `count` services use VIP address `addr` (0 removes it), with
    /// `lb_common::maps::VIP_ADDR_F_HOST` set in it for an address of the host itself. A used
    /// address is added to the VIP filter; a removed one stays there until the next
    /// [`Self::set_vip_filter`] (a stale bit costs a lookup, never a packet).
    pub fn set_vip_addr(&mut self, addr: [u8; 16], count: u32) -> Result<(), DataplaneError> {
        if count != 0 {
            self.allow_in_vip_filter([addr])?;
        }
        let name = names::VIP_ADDRS;
        let mut map: HashMap<_, [u8; 16], u32> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        if count == 0 {
            map.remove(&addr).map_err(map_error(name))
        } else {
            map.insert(addr, count, 0).map_err(map_error(name))
        }
    }

    /// Sets the VIP filter bits of `addrs` and clears every other: afterwards exactly these
    /// addresses (and any sharing their bits) reach the service lookup. Only changed words are
    /// written. To add addresses without a gap, write the filter with old and new addresses
    /// before their services, and with the new ones alone once the old services are removed.
    pub fn set_vip_filter(
        &mut self,
        addrs: impl IntoIterator<Item = [u8; 16]>,
    ) -> Result<(), DataplaneError> {
        let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
        for addr in addrs {
            let bit = vip_filter_bit(&addr);
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.write_vip_filter(words)
    }

    /// Lets every address of adopted services (pinned `VIP_ADDRS`) through the VIP filter, so
    /// that programs attached before the first apply serve them even when the filter is new
    /// (pinned by a version without it).
    fn allow_adopted_vips(&mut self) -> Result<(), DataplaneError> {
        let name = names::VIP_ADDRS;
        let map: HashMap<_, [u8; 16], u32> = self.map(name)?.try_into().map_err(map_error(name))?;
        let adopted: Vec<[u8; 16]> = map.keys().filter_map(Result::ok).collect();
        if adopted.is_empty() {
            return Ok(());
        }
        self.allow_in_vip_filter(adopted)
    }

    /// Adds `addrs` to the VIP filter, keeping every bit already set.
    fn allow_in_vip_filter(
        &mut self,
        addrs: impl IntoIterator<Item = [u8; 16]>,
    ) -> Result<(), DataplaneError> {
        let mut words = self.vip_filter_words()?;
        let mut changed = Vec::new();
        for addr in addrs {
            let bit = vip_filter_bit(&addr);
            let (index, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if words[index] & mask == 0 {
                words[index] |= mask;
                changed.push((index as u32, words[index]));
            }
        }
        self.write_vip_filter_words(&changed)?;
        self.vip_filter = Some(words);
        Ok(())
    }

    /// The VIP filter's words as last written (read from the kernel the first time).
    fn vip_filter_words(&mut self) -> Result<Vec<u64>, DataplaneError> {
        if let Some(words) = self.vip_filter.take() {
            return Ok(words);
        }
        use std::os::fd::AsRawFd as _;
        let name = names::VIP_FILTER;
        let fd = self.map_fd(name)?.as_raw_fd();
        // One batch read (an array comes back in index order), not a call per word.
        let words: Vec<(u32, u64)> = crate::syscall::read_all(fd)
            .and_then(|words| {
                if words.len() == VIP_FILTER_WORDS as usize {
                    Ok(words)
                } else {
                    Err(std::io::Error::other("partial batch read"))
                }
            })
            .map_err(|io_error| {
                map_error(name)(MapError::SyscallError(aya::sys::SyscallError {
                    call: "BPF_MAP_LOOKUP_BATCH",
                    io_error,
                }))
            })?;
        Ok(words.into_iter().map(|(_, word)| word).collect())
    }

    /// Writes the filter `words` where they differ from what was last written.
    fn write_vip_filter(&mut self, words: Vec<u64>) -> Result<(), DataplaneError> {
        let old = self.vip_filter_words()?;
        let changed: Vec<(u32, u64)> = words
            .iter()
            .zip(&old)
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(i, (new, _))| (i as u32, *new))
            .collect();
        // On failure the cache is dropped: the next write reads the kernel's words again.
        self.write_vip_filter_words(&changed)?;
        self.vip_filter = Some(words);
        Ok(())
    }

    fn write_vip_filter_words(&mut self, changed: &[(u32, u64)]) -> Result<(), DataplaneError> {
        let name = names::VIP_FILTER;
        let mut map: Array<_, u64> = self.map_mut(name)?.try_into().map_err(map_error(name))?;
        for (index, word) in changed {
            map.set(*index, word, 0).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// Makes the source-range trie hold exactly `ranges` (address, prefix length) for
    /// `service_id`: the clients a frontend with `SERVICE_F_SOURCE_RANGES` and this id admits.
    /// The new ranges are inserted before the old ones are removed, so a client in both is
    /// never cut off meanwhile. Ranges written twice, or with host bits set, count once.
    /// Nothing is written when a range is invalid (a prefix longer than its address).
    pub fn set_source_ranges(
        &mut self,
        service_id: u32,
        ranges: &[(IpAddr, u8)],
    ) -> Result<(), DataplaneError> {
        let wanted = ranges
            .iter()
            .map(|&(addr, len)| {
                source_range_key_of(service_id, addr, len)
                    .ok_or(DataplaneError::SourceRange { addr, len })
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        let mut written = self.source_range_keys()?;
        let current = written.remove(&service_id).unwrap_or_default();
        // On failure the cache is dropped: the next call reads the kernel's keys again.
        self.write_source_ranges(&current, &wanted)?;
        if !wanted.is_empty() {
            written.insert(service_id, wanted);
        }
        self.source_ranges = Some(written);
        Ok(())
    }

    /// Removes every source range of `service_id`. Call it when the id is freed too: an id
    /// handed out again would otherwise inherit the ranges (harmless without
    /// `SERVICE_F_SOURCE_RANGES`, which alone makes the data plane look).
    pub fn clear_source_ranges(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        self.set_source_ranges(service_id, &[])
    }

    /// The source ranges the kernel holds for `service_id` (address, prefix length), read from
    /// the trie itself.
    pub fn source_ranges(&self, service_id: u32) -> Result<Vec<(IpAddr, u8)>, DataplaneError> {
        Ok(self
            .read_source_range_keys()?
            .remove(&service_id)
            .unwrap_or_default()
            .iter()
            .filter_map(source_range_of)
            .collect())
    }

    /// Inserts the keys of `wanted` not in `current`, then removes those of `current` not in
    /// `wanted`.
    fn write_source_ranges(
        &mut self,
        current: &BTreeSet<SourceRangeKey>,
        wanted: &BTreeSet<SourceRangeKey>,
    ) -> Result<(), DataplaneError> {
        let name = names::SOURCE_RANGES;
        let mut trie: LpmTrie<_, [u8; 20], u32> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        for key in wanted.difference(current) {
            trie.insert(&Key::new(key.prefixlen, key.data()), 0, 0)
                .map_err(map_error(name))?;
        }
        for key in current.difference(wanted) {
            match trie.remove(&Key::new(key.prefixlen, key.data())) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DataplaneError::Map { name, source }),
            }
        }
        Ok(())
    }

    /// The trie's keys by service id as last written (read from the kernel the first time).
    fn source_range_keys(
        &mut self,
    ) -> Result<BTreeMap<u32, BTreeSet<SourceRangeKey>>, DataplaneError> {
        match self.source_ranges.take() {
            Some(keys) => Ok(keys),
            None => self.read_source_range_keys(),
        }
    }

    /// The trie's keys by service id, read from the kernel.
    fn read_source_range_keys(
        &self,
    ) -> Result<BTreeMap<u32, BTreeSet<SourceRangeKey>>, DataplaneError> {
        let name = names::SOURCE_RANGES;
        let trie: LpmTrie<_, [u8; 20], u32> =
            self.map(name)?.try_into().map_err(map_error(name))?;
        let mut keys: BTreeMap<u32, BTreeSet<SourceRangeKey>> = BTreeMap::new();
        for key in trie.keys() {
            let key = key.map_err(map_error(name))?;
            let data = key.data();
            let mut addr = [0; 16];
            addr.copy_from_slice(&data[4..]);
            let service_id = [data[0], data[1], data[2], data[3]];
            keys.entry(u32::from_be_bytes(service_id))
                .or_default()
                .insert(SourceRangeKey {
                    prefixlen: key.prefix_len(),
                    service_id,
                    addr,
                });
        }
        Ok(keys)
    }

    /// Writes backend slot `id` (a zero `flags` empties it), and its entry in `BACKEND_IDS`
    /// (how a tunnel packet names it), removing the entry of the backend it replaces. The
    /// index is written before the slot and cleared after it: a tunnel packet that finds an
    /// index finds its slot.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        let name = names::BACKENDS;
        let map: Array<_, Backend> = self.map(name)?.try_into().map_err(map_error(name))?;
        let old = map.get(&id, 0).map_err(map_error(name))?;
        let index_of = |b: &Backend| BackendKey {
            addr: b.addr,
            port: b.port,
            pad: 0,
            service_id: b.service_id,
        };
        let ids = names::BACKEND_IDS;
        let live = backend.flags & BACKEND_F_VALID != 0;
        if live {
            let mut index: HashMap<_, BackendKey, u32> =
                self.map_mut(ids)?.try_into().map_err(map_error(ids))?;
            index
                .insert(index_of(backend), id, 0)
                .map_err(map_error(ids))?;
        }
        let mut map: Array<_, Backend> = self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.set(id, backend, 0).map_err(map_error(name))?;
        let replaced = index_of(&old);
        if old.flags & BACKEND_F_VALID != 0 && !(live && replaced == index_of(backend)) {
            let mut index: HashMap<_, BackendKey, u32> =
                self.map_mut(ids)?.try_into().map_err(map_error(ids))?;
            // Only the entry that still names this slot: another slot may hold it by now.
            if index.get(&replaced, 0).ok() == Some(id) {
                index.remove(&replaced).map_err(map_error(ids))?;
            }
        }
        Ok(())
    }

    /// Writes this node's end of the tunnel, and makes `peers` the only addresses whose tunnel
    /// packets are taken.
    pub fn set_tunnel(
        &mut self,
        config: &TunnelConfig,
        peers: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        let name = names::TUNNEL_PEERS;
        let mut map: HashMap<_, [u8; 16], u32> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        let wanted: BTreeSet<[u8; 16]> = peers.iter().map(|a| addr16(*a)).collect();
        let stale: Vec<[u8; 16]> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for addr in &wanted {
            map.insert(addr, 0, 0).map_err(map_error(name))?;
        }
        for addr in &stale {
            let _ = map.remove(addr);
        }
        let name = names::TUNNEL;
        let mut map: Array<_, TunnelConfig> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.set(0, config, 0).map_err(map_error(name))
    }

    /// Swaps in a service's Maglev table (slot -> backend id) with one map update: the table is
    /// built whole off to the side first, so no packet sees a half-written one.
    pub fn set_maglev_table(
        &mut self,
        service_id: u32,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        self.set_maglev_tables(&[(service_id, MaglevTable::single(table.to_vec()))])
    }

    /// Swaps in several services' Maglev tables. The kernel waits for running programs after
    /// every update of a map-in-map (an RCU grace period, milliseconds), so the tables are
    /// built first and inserted with one batch update: one wait per apply, not per service.
    pub fn set_maglev_tables(
        &mut self,
        tables: &[(u32, MaglevTable)],
    ) -> Result<(), DataplaneError> {
        let name = names::MAGLEV;
        if tables.is_empty() {
            return Ok(());
        }
        let mut inners = Vec::with_capacity(tables.len());
        for (_, table) in tables {
            let size = table.size as usize;
            if size == 0
                || size > MAGLEV_MAX_SIZE as usize
                || (table.slots.len() != size && table.slots.len() != 2 * size)
            {
                return Err(DataplaneError::TableSize(table.slots.len()));
            }
            inners.push(new_maglev_table(table).map_err(map_error(name))?);
        }
        let keys: Vec<u32> = tables.iter().map(|(id, _)| *id).collect();
        let fds: Vec<u32> = inners
            .iter()
            .map(|inner| {
                use std::os::fd::{AsFd as _, AsRawFd as _};
                inner.fd().as_fd().as_raw_fd() as u32
            })
            .collect();
        let outer = self.map_mut(name)?;
        let outer_fd = match outer {
            Map::HashOfMaps(data) => {
                use std::os::fd::{AsFd as _, AsRawFd as _};
                data.fd().as_fd().as_raw_fd() as u32
            }
            _ => {
                return Err(DataplaneError::Missing {
                    kind: "hash-of-maps",
                    name,
                });
            }
        };
        match crate::syscall::update_batch(outer_fd, &keys, &fds) {
            Ok(()) => Ok(()),
            // Kernels without batch updates of this map type: one update per table.
            Err(_) => {
                let mut outer: HashOfMaps<_, u32, MapData> =
                    self.map_mut(name)?.try_into().map_err(map_error(name))?;
                for (key, inner) in keys.iter().zip(&inners) {
                    outer.insert(key, inner, 0).map_err(map_error(name))?;
                }
                Ok(())
            }
        }
    }

    /// Removes a service's Maglev table.
    pub fn remove_maglev_table(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        let name = names::MAGLEV;
        let mut outer: HashOfMaps<_, u32, MapData> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        outer.remove(&service_id).map_err(map_error(name))
    }

    /// Lets the XDP program redirect frames to interface `ifindex`.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let name = names::TX_PORTS;
        let mut map: DevMapHash<_> = self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.insert(ifindex, ifindex, None, 0)
            .map_err(|source| DataplaneError::TxPort { ifindex, source })
    }

    /// Stops the XDP program redirecting frames to interface `ifindex`.
    pub fn remove_tx_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let name = names::TX_PORTS;
        let mut map: DevMapHash<_> = self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.remove(ifindex).map_err(map_error(name))
    }

    /// Removes every connection-table, reverse-NAT and affinity entry that points at one of
    /// `backend_ids`; returns how many flows were removed.
    pub fn purge_backends(
        &mut self,
        backend_ids: &std::collections::HashSet<u32>,
    ) -> Result<usize, DataplaneError> {
        if backend_ids.is_empty() {
            return Ok(0);
        }
        let flows = self.remove_where::<FlowKey, FlowValue>(names::CONNTRACK, |v| {
            backend_ids.contains(&v.backend_id)
        })?;
        self.remove_where::<FlowKey, ReverseValue>(names::REVERSE_NAT, |v| {
            backend_ids.contains(&v.backend_id)
        })?;
        self.remove_where::<AffinityKey, AffinityValue>(names::AFFINITY, |v| {
            backend_ids.contains(&v.backend_id)
        })?;
        Ok(flows)
    }

    /// Removes the entries of hash map `name` whose value is `stale`; returns how many.
    fn remove_where<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        stale: impl Fn(&V) -> bool,
    ) -> Result<usize, DataplaneError> {
        let mut map: HashMap<_, K, V> = self.map_mut(name)?.try_into().map_err(map_error(name))?;
        let keys: Vec<K> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| stale(v))
            .map(|(k, _)| k)
            .collect();
        for key in &keys {
            // An entry the LRU evicted meanwhile is gone already.
            let _ = map.remove(key);
        }
        Ok(keys.len())
    }

    /// The connection table's entries.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DataplaneError> {
        self.entries(names::CONNTRACK)
    }

    /// The reverse-NAT table's entries.
    pub fn reverse_flows(&self) -> Result<Vec<(FlowKey, ReverseValue)>, DataplaneError> {
        self.entries(names::REVERSE_NAT)
    }

    fn entries<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(K, V)>, DataplaneError> {
        let map: HashMap<_, K, V> = self.map(name)?.try_into().map_err(map_error(name))?;
        map.iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(name))
    }

    /// Writes a connection-table entry (for tests and repair tools: the data path writes them).
    pub fn set_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<(), DataplaneError> {
        let name = names::CONNTRACK;
        let mut map: HashMap<_, FlowKey, FlowValue> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.insert(key, value, 0).map_err(map_error(name))
    }

    /// Removes a connection-table entry, as the kernel's LRU evicts one (for tests).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), DataplaneError> {
        let name = names::CONNTRACK;
        let mut map: HashMap<_, FlowKey, FlowValue> =
            self.map_mut(name)?.try_into().map_err(map_error(name))?;
        map.remove(key).map_err(map_error(name))
    }

    /// Counters summed over all CPUs, one per [`Reason`], in index order. A reason past the
    /// end of a `STATS` pinned by an older version (fewer reasons) reads as zero: the kernel
    /// cannot count it there until the data plane is detached and loaded afresh.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, Counter)>, DataplaneError> {
        let name = names::STATS;
        reasons(&self.map(name)?.try_into().map_err(map_error(name))?)
    }

    /// The summed counter of one reason.
    pub fn reason_counter(&self, reason: Reason) -> Result<Counter, DataplaneError> {
        Ok(self.reason_counters()?[reason as usize].1)
    }

    /// Event counts summed over all CPUs, one per [`Event`], in index order.
    pub fn event_counters(&self) -> Result<Vec<(Event, u64)>, DataplaneError> {
        let name = names::EVENTS;
        events(&self.map(name)?.try_into().map_err(map_error(name))?)
    }

    /// The summed count of one event.
    pub fn event_counter(&self, event: Event) -> Result<u64, DataplaneError> {
        Ok(self.event_counters()?[event as usize].1)
    }

    /// A service's traffic summed over all CPUs.
    pub fn service_counter(&self, service_id: u32) -> Result<FlowCounter, DataplaneError> {
        self.flow_counter(names::SERVICE_STATS, service_id)
    }

    /// A backend's traffic summed over all CPUs.
    pub fn backend_counter(&self, backend_id: u32) -> Result<FlowCounter, DataplaneError> {
        self.flow_counter(names::BACKEND_STATS, backend_id)
    }

    /// A reader of the counters with file descriptors of its own: it reads them from another
    /// thread than the one that owns (and applies to) the data plane, so a scrape never waits
    /// for an apply.
    pub fn counter_reader(&self) -> Result<CounterReader, DataplaneError> {
        let clone = |name: &'static str| -> Result<Map, DataplaneError> {
            use std::os::fd::AsFd as _;
            let Map::PerCpuArray(data) = self.map(name)? else {
                return Err(DataplaneError::Missing {
                    kind: "per-CPU array",
                    name,
                });
            };
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
                map_error(name)(MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                }))
            })?;
            Map::from_map_data(MapData::from_fd(fd).map_err(map_error(name))?)
                .map_err(map_error(name))
        };
        Ok(CounterReader {
            stats: clone(names::STATS)?
                .try_into()
                .map_err(map_error(names::STATS))?,
            events: clone(names::EVENTS)?
                .try_into()
                .map_err(map_error(names::EVENTS))?,
            service_stats: clone(names::SERVICE_STATS)?
                .try_into()
                .map_err(map_error(names::SERVICE_STATS))?,
            backend_stats: clone(names::BACKEND_STATS)?
                .try_into()
                .map_err(map_error(names::BACKEND_STATS))?,
        })
    }

    /// Zeroes the traffic counters (every CPU's) of services `service_ids` and backends
    /// `backend_ids`: an id handed out again must not carry its previous holder's totals.
    pub fn reset_flow_counters(
        &mut self,
        service_ids: &[u32],
        backend_ids: &[u32],
    ) -> Result<(), DataplaneError> {
        for (name, ids) in [
            (names::SERVICE_STATS, service_ids),
            (names::BACKEND_STATS, backend_ids),
        ] {
            if ids.is_empty() {
                continue;
            }
            let mut map: PerCpuArray<_, FlowCounter> =
                self.map_mut(name)?.try_into().map_err(map_error(name))?;
            let cpus_error = |io_error| {
                map_error(name)(MapError::SyscallError(aya::sys::SyscallError {
                    call: "nr_cpus",
                    io_error,
                }))
            };
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| cpus_error(e))?;
            for &id in ids {
                let zero = aya::maps::PerCpuValues::try_from(vec![FlowCounter::default(); cpus])
                    .map_err(cpus_error)?;
                map.set(id, zero, 0).map_err(map_error(name))?;
            }
        }
        Ok(())
    }

    fn flow_counter(&self, name: &'static str, index: u32) -> Result<FlowCounter, DataplaneError> {
        flow_counter(
            &self.map(name)?.try_into().map_err(map_error(name))?,
            name,
            index,
        )
    }
}

/// The data plane's counters (per reason, per event, per service, per backend), read through
/// file descriptors of their own: see [`Dataplane::counter_reader`].
pub struct CounterReader {
    stats: PerCpuArray<MapData, Counter>,
    events: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, FlowCounter>,
    backend_stats: PerCpuArray<MapData, FlowCounter>,
}

impl CounterReader {
    /// As [`Dataplane::reason_counters`].
    pub fn reason_counters(&self) -> Result<Vec<(Reason, Counter)>, DataplaneError> {
        reasons(&self.stats)
    }

    /// As [`Dataplane::event_counters`].
    pub fn event_counters(&self) -> Result<Vec<(Event, u64)>, DataplaneError> {
        events(&self.events)
    }

    /// As [`Dataplane::service_counter`].
    pub fn service_counter(&self, service_id: u32) -> Result<FlowCounter, DataplaneError> {
        flow_counter(&self.service_stats, names::SERVICE_STATS, service_id)
    }

    /// As [`Dataplane::backend_counter`].
    pub fn backend_counter(&self, backend_id: u32) -> Result<FlowCounter, DataplaneError> {
        flow_counter(&self.backend_stats, names::BACKEND_STATS, backend_id)
    }
}

fn reasons<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, Counter>,
) -> Result<Vec<(Reason, Counter)>, DataplaneError> {
    let name = names::STATS;
    Reason::ALL
        .iter()
        .map(|&reason| {
            if reason as u32 >= stats.len() {
                return Ok((reason, Counter::default()));
            }
            let per_cpu = stats.get(&(reason as u32), 0).map_err(map_error(name))?;
            Ok((reason, per_cpu.iter().sum::<Counter>()))
        })
        .collect()
}

fn events<T: std::borrow::Borrow<MapData>>(
    events: &PerCpuArray<T, u64>,
) -> Result<Vec<(Event, u64)>, DataplaneError> {
    let name = names::EVENTS;
    Event::ALL
        .iter()
        .map(|&event| {
            let per_cpu = events.get(&(event as u32), 0).map_err(map_error(name))?;
            Ok((event, per_cpu.iter().sum()))
        })
        .collect()
}

fn flow_counter<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, FlowCounter>,
    name: &'static str,
    index: u32,
) -> Result<FlowCounter, DataplaneError> {
    let per_cpu = map.get(&index, 0).map_err(map_error(name))?;
    Ok(per_cpu.iter().sum::<FlowCounter>())
}

/// Creates a Maglev table (slot 0: its size; then the backend ids) and fills it through a
/// memory mapping: one `mmap` instead of one system call per slot.
fn new_maglev_table(table: &MaglevTable) -> Result<MapData, MapError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let slots = table.slots.len() + 1;
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        slots as u32,
        MAGLEV_TABLE_FLAGS,
    );
    let inner = MapData::create(obj, "maglev_table", None)?;
    // The kernel lays array elements out 8 bytes apart.
    const STRIDE: usize = 8;
    let page = 4096;
    let len = (slots * STRIDE).div_ceil(page) * page;
    let fd = inner.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh shared mapping of the map's memory, unmapped before returning.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error: std::io::Error::last_os_error(),
        }));
    }
    // SAFETY: `base` maps `len >= slots * STRIDE` bytes; each slot holds a u32.
    unsafe {
        let base = base.cast::<u8>();
        base.cast::<u32>().write(table.size);
        for (slot, id) in table.slots.iter().enumerate() {
            base.add((slot + 1) * STRIDE).cast::<u32>().write(*id);
        }
        libc::munmap(base.cast(), len);
    }
    Ok(inner)
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })
}

fn tc_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })
}

/// The operator-facing name of an XDP attach mode.
pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic (skb)",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "kernel default",
    }
}
