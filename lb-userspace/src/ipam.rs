//! Load balancer address assignment (LB IPAM): which addresses of which pools each
//! LoadBalancer Service gets. Pure: it converts objects and decides, with no I/O; the leader
//! calls [`allocate`] on every change of Services or pools and writes what it says into each
//! Service's `status.loadBalancer.ingress` ([`status_patch`]).
//!
//! The rules (docs/decisions.md, *Address assignment (LB IPAM)*), all deterministic and
//! independent of the order of the input:
//!
//! 1. An address is held by one Service, unless they share it: Services may share an address
//!    when all carry the same `lb.xdp.rs/allow-shared-ip` key and no two of them have a
//!    (port, protocol) in common (MetalLB's `allow-shared-ip`).
//! 2. Stability first: a Service keeps the addresses it shows (`status.loadBalancer.ingress`)
//!    while they are in a pool it may use, match its request, and no older Service holds them
//!    ([seniority](Claim::seniority): `creationTimestamp`, then namespace and name).
//! 3. A requested address (`spec.loadBalancerIP`, the `lb.xdp.rs/loadBalancerIPs` annotation)
//!    must lie in a pool (auto-assigning or not) and be free, or shareable.
//! 4. Otherwise, per wanted family: an address already used by Services of the same sharing
//!    key (when the Service has one), else the lowest free address of the first pool by name
//!    that auto-assigns (or of the pool named by `lb.xdp.rs/ip-pool`).
//! 5. Current addresses are held first (by seniority), then requests, then new choices, so a
//!    newcomer never takes an address a Service holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{api::core::v1::Service, jiff::Timestamp};

use crate::{
    crd::{LoadBalancerIPPool, LoadBalancerIPPoolStatus, PoolBlock},
    manifest::namespace_of,
};

/// Service annotation: the addresses requested, comma-separated, at most one per family
/// (`198.18.200.7,2001:db8:200::7`). `spec.loadBalancerIP` (deprecated by Kubernetes, still
/// honoured) adds to it.
pub const ANNOTATION_LOAD_BALANCER_IPS: &str = "lb.xdp.rs/loadBalancerIPs";
/// Service annotation: the only pool the Service's addresses may come from.
pub const ANNOTATION_IP_POOL: &str = "lb.xdp.rs/ip-pool";
/// Service annotation: the sharing key. Services with the same key and no (port, protocol) in
/// common may be given the same address.
pub const ANNOTATION_ALLOW_SHARED_IP: &str = "lb.xdp.rs/allow-shared-ip";
/// The `ipMode` written with each ingress address: traffic to it is addressed to the VIP
/// itself (the data plane serves the address), as kube-proxy assumes by default.
pub const INGRESS_IP_MODE: &str = "VIP";

/// Why a pool cannot be used: it names the object (or the flag) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A `LoadBalancerIPPool` object that does not describe addresses.
    #[error("LoadBalancerIPPool {pool}: {field}: {message}")]
    Pool {
        /// The object's name.
        pool: String,
        /// The field at fault (`spec.blocks[1].cidr`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// An `--ip-pool` flag that does not describe addresses.
    #[error("--ip-pool {text:?}: {message}")]
    Flag {
        /// The flag's value.
        text: String,
        /// What is wrong with it.
        message: String,
    },
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// The other family.
    pub fn other(self) -> Self {
        match self {
            Self::V4 => Self::V6,
            Self::V6 => Self::V4,
        }
    }

    /// As `spec.ipFamilies` writes it: `IPv4`, `IPv6`.
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// A family as `spec.ipFamilies` writes it (case-sensitive, as the API is).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "IPv4" => Some(Self::V4),
            "IPv6" => Some(Self::V6),
            _ => None,
        }
    }

    /// The prefix length of one address.
    fn bits(self) -> u32 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The address whose number is `value` (which must fit the family).
    fn address(self, value: u128) -> IpAddr {
        match self {
            // Values of V4 addresses come from `number` of a V4 address and stay within 32
            // bits (`next` checks); the truncation never drops a bit.
            Self::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
            Self::V6 => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }

    /// The highest address number of the family.
    fn max(self) -> u128 {
        match self {
            Self::V4 => u128::from(u32::MAX),
            Self::V6 => u128::MAX,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An address as a number, for arithmetic: pools are never enumerated, only counted and
/// walked from their first address.
fn number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address after `ip`, if the family has one.
fn next(ip: IpAddr) -> Option<IpAddr> {
    let family = IpFamily::of(ip);
    let value = number(ip).checked_add(1).filter(|v| *v <= family.max())?;
    Some(family.address(value))
}

/// The address before `ip`, if the family has one.
fn previous(ip: IpAddr) -> Option<IpAddr> {
    Some(IpFamily::of(ip).address(number(ip).checked_sub(1)?))
}

/// One block of a pool: the addresses handed out, `first..=last`, one family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressBlock {
    /// The block as written (`198.18.200.0/24`, `198.18.200.10-198.18.200.20`), for messages.
    pub written: String,
    /// The first address handed out.
    pub first: IpAddr,
    /// The last address handed out (same family as `first`, not below it).
    pub last: IpAddr,
    /// Addresses of the block kept back: a CIDR's first and last without
    /// `allowFirstLastIPs`.
    pub kept_back: Vec<IpAddr>,
}

impl AddressBlock {
    /// A CIDR block, `198.18.200.0/24`; without `allow_first_last`, the first and last address
    /// of an IPv4 CIDR shorter than /31 (network and broadcast) or an IPv6 CIDR shorter than
    /// /127 (the Subnet-Router anycast address and its counterpart) are kept back. `Err` says
    /// what is wrong with the text.
    pub fn cidr(text: &str, allow_first_last: bool) -> Result<Self, String> {
        let not_a_cidr = || format!("{text:?} is not a CIDR");
        let (address, length) = text.split_once('/').ok_or_else(not_a_cidr)?;
        let address: IpAddr = address.parse().map_err(|_| not_a_cidr())?;
        let family = IpFamily::of(address);
        let length: u32 = length
            .parse()
            .ok()
            .filter(|l| *l <= family.bits())
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a CIDR: an {family} prefix length is 0 to {}",
                    family.bits()
                )
            })?;
        let host_bits = family.bits() - length;
        // `checked_shl` is None for a shift of 128 (a /0 of IPv6): every bit is a host bit.
        let host_mask = 1u128
            .checked_shl(host_bits)
            .map_or(u128::MAX, |v| v - 1)
            .min(family.max());
        let start = number(address);
        if start & host_mask != 0 {
            let network = family.address(start & !host_mask);
            // Refused rather than rounded: `198.18.200.5/24` may mean the /24 or a range from
            // .5, and only its author knows.
            return Err(format!(
                "{text:?} has host bits set: the block would be {network}/{length}"
            ));
        }
        let (mut first, mut last) = (address, family.address(start | host_mask));
        let mut kept_back = Vec::new();
        if !allow_first_last && host_bits >= 2 {
            kept_back = vec![first, last];
            // At least 4 addresses: neither step leaves the block.
            first = next(first).unwrap_or(first);
            last = previous(last).unwrap_or(last);
        }
        Ok(Self {
            written: text.to_owned(),
            first,
            last,
            kept_back,
        })
    }

    /// A range block, `start` to `stop` inclusive, handed out whole. `Err` names the field at
    /// fault (`start` or `stop`) and what is wrong.
    pub fn range(start: &str, stop: &str) -> Result<Self, (&'static str, String)> {
        let parse = |field, text: &str| {
            text.parse::<IpAddr>()
                .map_err(|_| (field, format!("{text:?} is not an IP address")))
        };
        let (first, last) = (parse("start", start)?, parse("stop", stop)?);
        if IpFamily::of(first) != IpFamily::of(last) {
            return Err((
                "stop",
                format!(
                    "{last} is {}, start {first} is {}: a range is one family",
                    IpFamily::of(last),
                    IpFamily::of(first)
                ),
            ));
        }
        if last < first {
            return Err(("stop", format!("{last} is below start {first}")));
        }
        Ok(Self {
            written: format!("{first}-{last}"),
            first,
            last,
            kept_back: Vec::new(),
        })
    }

    /// The block's family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.first)
    }

    /// Whether `ip` is handed out by this block (kept-back addresses are not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.first <= ip && ip <= self.last
    }

    /// How many addresses the block hands out (saturating: an IPv6 /0 holds 2^128).
    pub fn size(&self) -> u128 {
        (number(self.last) - number(self.first)).saturating_add(1)
    }
}

/// A pool as the allocator uses it: parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pool {
    /// The `LoadBalancerIPPool`'s name, or `flag-N` for the N-th `--ip-pool` flag. Pools are
    /// tried in name order.
    pub name: String,
    /// Its blocks, as written.
    pub blocks: Vec<AddressBlock>,
    /// Whether it hands addresses to Services that ask for none.
    pub auto_assign: bool,
    /// Whether a CIDR's first and last addresses are handed out (`allowFirstLastIPs`).
    pub allow_first_last: bool,
}

impl Pool {
    /// Reads a `LoadBalancerIPPool` object; the error names it and the field at fault.
    pub fn from_resource(resource: &LoadBalancerIPPool) -> Result<Self, IpamError> {
        let name = resource.metadata.name.clone();
        let error = |field: String, message: String| IpamError::Pool {
            pool: name.clone().unwrap_or_else(|| "<unnamed>".into()),
            field,
            message,
        };
        let Some(pool_name) = name.clone() else {
            return Err(error("metadata.name".into(), "missing".into()));
        };
        let spec = &resource.spec;
        if spec.blocks.is_empty() {
            return Err(error(
                "spec.blocks".into(),
                "empty: a pool needs at least one block".into(),
            ));
        }
        let blocks = spec
            .blocks
            .iter()
            .enumerate()
            .map(|(i, block)| {
                read_block(block, spec.allow_first_last_ips)
                    .map_err(|(field, message)| error(format!("spec.blocks[{i}]{field}"), message))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: pool_name,
            blocks,
            auto_assign: spec.auto_assign,
            allow_first_last: spec.allow_first_last_ips,
        })
    }

    /// Reads an `--ip-pool CIDR|START-STOP` flag, the `index`-th (from 0): a pool named
    /// `flag-INDEX` that auto-assigns and keeps a CIDR's first and last addresses back, as a
    /// `LoadBalancerIPPool` does by default.
    pub fn from_flag(index: usize, text: &str) -> Result<Self, IpamError> {
        let error = |message: String| IpamError::Flag {
            text: text.to_owned(),
            message,
        };
        let block = if text.contains('/') {
            AddressBlock::cidr(text, false).map_err(error)?
        } else if let Some((start, stop)) = text.split_once('-') {
            AddressBlock::range(start.trim(), stop.trim())
                .map_err(|(field, message)| error(format!("{field}: {message}")))?
        } else {
            return Err(error(
                "expected a CIDR (198.18.200.0/24) or a range START-STOP \
                 (198.18.200.10-198.18.200.20)"
                    .into(),
            ));
        };
        Ok(Self {
            name: format!("flag-{index}"),
            blocks: vec![block],
            auto_assign: true,
            allow_first_last: false,
        })
    }

    /// Whether the pool hands out `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|b| b.contains(ip))
    }

    /// Whether the pool has addresses of `family`.
    pub fn has_family(&self, family: IpFamily) -> bool {
        self.blocks.iter().any(|b| b.family() == family)
    }

    /// The pool's blocks of `family`, lowest first.
    fn blocks_of(&self, family: IpFamily) -> Vec<&AddressBlock> {
        let mut blocks: Vec<&AddressBlock> = self
            .blocks
            .iter()
            .filter(|b| b.family() == family)
            .collect();
        blocks.sort_by_key(|b| (b.first, b.last));
        blocks
    }

    /// The block that keeps `ip` back, if one does.
    fn keeps_back(&self, ip: IpAddr) -> Option<&AddressBlock> {
        self.blocks.iter().find(|b| b.kept_back.contains(&ip))
    }
}

/// One block of a `LoadBalancerIPPool`; `Err` has the field under the block (`.cidr`, or empty
/// for the block itself) and the message.
fn read_block(block: &PoolBlock, allow_first_last: bool) -> Result<AddressBlock, (String, String)> {
    match (&block.cidr, &block.start, &block.stop) {
        (Some(cidr), None, None) => {
            AddressBlock::cidr(cidr, allow_first_last).map_err(|m| (".cidr".into(), m))
        }
        (None, Some(start), Some(stop)) => {
            AddressBlock::range(start, stop).map_err(|(field, m)| (format!(".{field}"), m))
        }
        (None, Some(_), None) => Err((".stop".into(), "missing (start is given)".into())),
        (None, None, Some(_)) => Err((".start".into(), "missing (stop is given)".into())),
        (None, None, None) => Err((
            String::new(),
            "empty: a block is a cidr, or a start and a stop".into(),
        )),
        (Some(_), _, _) => Err((
            String::new(),
            "both cidr and start/stop: a block is one or the other".into(),
        )),
    }
}

/// `spec.ipFamilyPolicy`: how many families a Service wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FamilyPolicy {
    /// One address, of the first family (the API server's default).
    #[default]
    SingleStack,
    /// One address per family when the pools have both; what can be had otherwise.
    PreferDualStack,
    /// One address per family, or none at all.
    RequireDualStack,
}

impl FamilyPolicy {
    /// A policy as the API writes it.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "SingleStack" => Some(Self::SingleStack),
            "PreferDualStack" => Some(Self::PreferDualStack),
            "RequireDualStack" => Some(Self::RequireDualStack),
            _ => None,
        }
    }

    /// Whether every wanted family must be had (`PreferDualStack` takes what it can).
    fn all_required(self) -> bool {
        self != Self::PreferDualStack
    }
}

/// A Service port as sharing sees it: two Services on one address must not have one in
/// common.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// The service port.
    pub port: u16,
    /// Its protocol as written (`TCP` when left out): `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// One LoadBalancer Service of ours asking for addresses: what [`allocate`] reads of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`: the caller's guard that the status it writes goes to this very object.
    pub uid: String,
    /// `metadata.creationTimestamp`: the older Service wins a disputed address.
    pub created: Option<Timestamp>,
    /// The families wanted, primary first (from `spec.ipFamilies` and `spec.ipFamilyPolicy`):
    /// one for `SingleStack`, both for the dual-stack policies when the cluster has both.
    pub families: Vec<IpFamily>,
    /// `spec.ipFamilyPolicy`.
    pub policy: FamilyPolicy,
    /// The addresses requested (`spec.loadBalancerIP` and the `lb.xdp.rs/loadBalancerIPs`
    /// annotation), at most one per family.
    pub requested: Vec<IpAddr>,
    /// The only pool its addresses may come from (`lb.xdp.rs/ip-pool`).
    pub pool: Option<String>,
    /// Its sharing key (`lb.xdp.rs/allow-shared-ip`).
    pub sharing_key: Option<String>,
    /// Its ports.
    pub ports: BTreeSet<PortKey>,
    /// The addresses it shows now (`status.loadBalancer.ingress[].ip`).
    pub current: Vec<IpAddr>,
    /// What makes its request unusable, found reading it (a request that is not an address,
    /// two of one family, an unknown family): such a claim is refused `InvalidRequest`.
    pub invalid: Option<String>,
}

impl Claim {
    /// The claim of a Service; `None` for one that is not ours to give addresses: a type
    /// other than `LoadBalancer`, a `spec.loadBalancerClass` other than `class` (a Service
    /// with none is ours), or no name.
    pub fn from_service(service: &Service, class: &str) -> Option<Self> {
        let spec = service.spec.as_ref()?;
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return None;
        }
        if spec
            .load_balancer_class
            .as_deref()
            .is_some_and(|c| c != class)
        {
            return None;
        }
        let metadata = &service.metadata;
        let name = metadata.name.clone()?;
        let annotations = metadata.annotations.clone().unwrap_or_default();
        let annotation = |key: &str| {
            annotations
                .get(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut problems = Vec::new();

        let policy = match spec.ip_family_policy.as_deref() {
            None => FamilyPolicy::SingleStack,
            Some(text) => FamilyPolicy::parse(text).unwrap_or_else(|| {
                problems.push(format!("spec.ipFamilyPolicy: {text:?} is not a policy"));
                FamilyPolicy::SingleStack
            }),
        };
        let mut families: Vec<IpFamily> = Vec::new();
        for (i, text) in spec.ip_families.iter().flatten().enumerate() {
            match IpFamily::parse(text) {
                Some(family) if !families.contains(&family) => families.push(family),
                Some(_) => {}
                None => problems.push(format!("spec.ipFamilies[{i}]: {text:?} is not a family")),
            }
        }
        if families.is_empty() {
            // A Service the API server has not defaulted (read from a file): the families of
            // its cluster IPs, else IPv4, the API server's own default.
            let cluster_ips = spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip);
            for ip in cluster_ips.filter_map(|t| t.parse::<IpAddr>().ok()) {
                if !families.contains(&IpFamily::of(ip)) {
                    families.push(IpFamily::of(ip));
                }
            }
        }
        let primary = families.first().copied().unwrap_or(IpFamily::V4);
        families = match policy {
            FamilyPolicy::SingleStack => vec![primary],
            // Both, by definition of the policy, primary first.
            FamilyPolicy::RequireDualStack => vec![primary, primary.other()],
            // What the API server listed: in a single-stack cluster only one family has
            // endpoints, and an address of the other would serve nothing.
            FamilyPolicy::PreferDualStack if families.is_empty() => vec![primary],
            FamilyPolicy::PreferDualStack => families,
        };

        let mut requested: Vec<(String, IpAddr)> = Vec::new();
        let mut request = |field: String, text: &str| match text.parse::<IpAddr>() {
            Ok(ip) => requested.push((field, ip)),
            Err(_) => problems.push(format!("{field}: {text:?} is not an IP address")),
        };
        if let Some(text) = spec.load_balancer_ip.as_deref().map(str::trim)
            && !text.is_empty()
        {
            request("spec.loadBalancerIP".into(), text);
        }
        if let Some(list) = annotation(ANNOTATION_LOAD_BALANCER_IPS) {
            let field = format!("metadata.annotations[{ANNOTATION_LOAD_BALANCER_IPS}]");
            for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                request(field.clone(), text);
            }
        }
        let mut by_family: BTreeMap<IpFamily, (String, IpAddr)> = BTreeMap::new();
        for (field, ip) in requested {
            let family = IpFamily::of(ip);
            match by_family.get(&family) {
                Some((_, seen)) if *seen == ip => {}
                Some((seen_field, seen)) => problems.push(format!(
                    "{field}: {ip} and {seen} ({seen_field}) are both {family}: at most one \
                     address per family is requested"
                )),
                None if !families.contains(&family) => problems.push(format!(
                    "{field}: {ip} is {family}, and the Service's families are {}",
                    families_text(&families)
                )),
                None => {
                    by_family.insert(family, (field, ip));
                }
            }
        }

        let mut ports = BTreeSet::new();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            match u16::try_from(port.port).ok().filter(|p| *p != 0) {
                Some(number) => {
                    ports.insert(PortKey {
                        port: number,
                        protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    });
                }
                None => problems.push(format!(
                    "spec.ports[{i}].port: {} is not a port (1 to 65535)",
                    port.port
                )),
            }
        }

        // The status is ours to write: an entry that is not an address (a hostname, another
        // writer's) is not one we can keep.
        let current = ingress_addresses(service);

        Some(Self {
            namespace: namespace_of(metadata.namespace.as_deref()).to_owned(),
            name,
            uid: metadata.uid.clone().unwrap_or_default(),
            created: metadata.creation_timestamp.as_ref().map(|t| t.0),
            families,
            policy,
            requested: by_family.into_values().map(|(_, ip)| ip).collect(),
            pool: annotation(ANNOTATION_IP_POOL),
            sharing_key: annotation(ANNOTATION_ALLOW_SHARED_IP),
            ports,
            current,
            invalid: problems.into_iter().next(),
        })
    }

    /// `namespace/name`, as messages name a Service.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The order in which claims hold addresses: the oldest `creationTimestamp` first (one
    /// without comes after every one with), then namespace and name: model.rs's `seniority`,
    /// the rule by which the data plane decides between two Services on one VIP:port. The uid
    /// last, so that the order never depends on the input's.
    pub fn seniority(&self) -> (bool, Option<Timestamp>, &str, &str, &str) {
        (
            self.created.is_none(),
            self.created,
            &self.namespace,
            &self.name,
            &self.uid,
        )
    }

    /// Whether this claim and `other` may hold one address: both carry the same sharing key
    /// and have no (port, protocol) in common.
    pub fn may_share_with(&self, other: &Claim) -> bool {
        self.sharing_key.is_some()
            && self.sharing_key == other.sharing_key
            && self.ports.is_disjoint(&other.ports)
    }
}

fn families_text(families: &[IpFamily]) -> String {
    let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
    format!("[{}]", names.join(", "))
}

/// Why a claim got no addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// A requested address is in no pool (or not in the pool the Service names).
    NotInAnyPool,
    /// A requested address is held by another Service, and they may not share it.
    InUse {
        /// The holder, `namespace/name`.
        by: String,
    },
    /// No free address in the pools tried (or no pool to try).
    PoolExhausted,
    /// The pool the Service names (`lb.xdp.rs/ip-pool`) does not exist.
    UnknownPool,
    /// The pools the Service may use have no address of a family it requires.
    FamilyUnavailable,
    /// The request itself is unusable (see [`Claim::invalid`]).
    InvalidRequest,
}

impl RefusalReason {
    /// The reason as a Kubernetes event reason (UpperCamelCase), for the caller's events.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::NotInAnyPool => "AddressNotInAnyPool",
            Self::InUse { .. } => "AddressInUse",
            Self::PoolExhausted => "PoolExhausted",
            Self::UnknownPool => "UnknownPool",
            Self::FamilyUnavailable => "FamilyUnavailable",
            Self::InvalidRequest => "InvalidRequest",
        }
    }
}

/// What a claim gets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Its whole ingress list, IPv4 first: the addresses to write in
    /// `status.loadBalancer.ingress`.
    Assigned(Vec<IpAddr>),
    /// No address: why, and a message for its event.
    Refused {
        /// The reason.
        reason: RefusalReason,
        /// A sentence naming what is at fault (the address, the pool, the holder).
        message: String,
    },
}

/// [`allocate`]'s answer for one claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Allocation {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// The claim's uid.
    pub uid: String,
    /// What it gets.
    pub decision: Decision,
}

impl Allocation {
    /// The ingress addresses to write: the assigned ones, none when refused (a refused
    /// Service holds nothing: its old addresses go back to the pools).
    pub fn ingress(&self) -> &[IpAddr] {
        match &self.decision {
            Decision::Assigned(addresses) => addresses,
            Decision::Refused { .. } => &[],
        }
    }
}

/// A refusal in the making.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    reason: RefusalReason,
    message: String,
}

impl Refusal {
    fn new(reason: RefusalReason, message: String) -> Self {
        Self { reason, message }
    }
}

/// What a claim may have, decided from itself and the pools alone.
struct Plan<'a> {
    /// The families it will try, primary first (a `PreferDualStack` claim's unavailable
    /// families are left out).
    families: Vec<IpFamily>,
    /// The pools its own choices and kept addresses come from: the one it names, else those
    /// that auto-assign, in name order.
    pools: Vec<&'a Pool>,
    /// Its request, per family.
    requested: BTreeMap<IpFamily, IpAddr>,
    /// Every family of `families` must be had.
    all_required: bool,
}

impl Plan<'_> {
    /// Whether the claim may keep `ip` (rule 2): of a family it tries, its request in that
    /// family, or else in a pool it may use.
    fn may_keep(&self, ip: IpAddr) -> bool {
        let family = IpFamily::of(ip);
        if !self.families.contains(&family) {
            return false;
        }
        match self.requested.get(&family) {
            Some(request) => *request == ip,
            None => self.pools.iter().any(|p| p.contains(ip)),
        }
    }

    /// The names of the pools tried: those with addresses of `family`, or all.
    fn pool_names(&self, family: Option<IpFamily>) -> String {
        let names: Vec<&str> = self
            .pools
            .iter()
            .filter(|p| family.is_none_or(|f| p.has_family(f)))
            .map(|p| p.name.as_str())
            .collect();
        names.join(", ")
    }
}

/// The plan of `claim`, or its refusal when the claim alone (with the pools) decides it: an
/// invalid request, an unknown pool, a requested address in no pool, a family no pool has.
fn plan<'a>(claim: &Claim, pools: &[&'a Pool]) -> Result<Plan<'a>, Refusal> {
    if let Some(problem) = &claim.invalid {
        return Err(Refusal::new(RefusalReason::InvalidRequest, problem.clone()));
    }
    if claim.families.is_empty() {
        return Err(Refusal::new(
            RefusalReason::InvalidRequest,
            "the Service has no IP family".into(),
        ));
    }
    let mut requested = BTreeMap::new();
    for ip in &claim.requested {
        let family = IpFamily::of(*ip);
        if !claim.families.contains(&family) {
            return Err(Refusal::new(
                RefusalReason::InvalidRequest,
                format!(
                    "{ip} is requested, and the Service's families are {}",
                    families_text(&claim.families)
                ),
            ));
        }
        if let Some(other) = requested.insert(family, *ip).filter(|other| other != ip) {
            return Err(Refusal::new(
                RefusalReason::InvalidRequest,
                format!("{other} and {ip} are both requested: at most one {family} address"),
            ));
        }
    }
    let usable: Vec<&Pool> = match &claim.pool {
        Some(name) => {
            let named: Vec<&Pool> = pools.iter().copied().filter(|p| &p.name == name).collect();
            if named.is_empty() {
                return Err(Refusal::new(
                    RefusalReason::UnknownPool,
                    format!(
                        "pool {name:?} ({ANNOTATION_IP_POOL}) does not exist{}",
                        known_pools(pools)
                    ),
                ));
            }
            named
        }
        None => pools.iter().copied().filter(|p| p.auto_assign).collect(),
    };
    for ip in requested.values() {
        let within: &[&Pool] = if claim.pool.is_some() { &usable } else { pools };
        if !within.iter().any(|p| p.contains(*ip)) {
            return Err(Refusal::new(
                RefusalReason::NotInAnyPool,
                not_in_pools(*ip, claim.pool.as_deref(), pools),
            ));
        }
    }
    let available = |family: IpFamily| {
        requested.contains_key(&family) || usable.iter().any(|p| p.has_family(family))
    };
    let all_required = claim.policy.all_required();
    // Every wanted family when all are required; else (PreferDualStack) those to be had.
    let families: Vec<IpFamily> = claim
        .families
        .iter()
        .copied()
        .filter(|f| all_required || available(*f))
        .collect();
    let missing: Vec<IpFamily> = if families.is_empty() {
        claim.families.clone()
    } else {
        families
            .iter()
            .copied()
            .filter(|f| !available(*f))
            .collect()
    };
    if missing.is_empty() {
        return Ok(Plan {
            families,
            pools: usable,
            requested,
            all_required,
        });
    }
    if usable.is_empty() {
        // Nothing to try: no pool auto-assigns, and the Service names none.
        return Err(Refusal::new(
            RefusalReason::PoolExhausted,
            format!(
                "no LoadBalancerIPPool hands out addresses automatically{}: request an \
                 address ({ANNOTATION_LOAD_BALANCER_IPS}) or name a pool ({ANNOTATION_IP_POOL})",
                known_pools(pools)
            ),
        ));
    }
    let names: Vec<&str> = usable.iter().map(|p| p.name.as_str()).collect();
    let missing: Vec<&str> = missing.iter().map(|f| f.name()).collect();
    Err(Refusal::new(
        RefusalReason::FamilyUnavailable,
        format!(
            "no {} addresses in {} (the Service's ipFamilyPolicy is {:?})",
            missing.join(" or "),
            pool_list_text(&names.join(", ")),
            claim.policy
        ),
    ))
}

fn known_pools(pools: &[&Pool]) -> String {
    if pools.is_empty() {
        return " (there is no pool)".into();
    }
    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    format!(" (pools: {})", names.join(", "))
}

/// Why `ip` is not a requestable address: outside every pool, outside the named one, or kept
/// back by its block.
fn not_in_pools(ip: IpAddr, named: Option<&str>, pools: &[&Pool]) -> String {
    if let Some((pool, block)) = pools
        .iter()
        .find_map(|p| p.keeps_back(ip).map(|b| (p, b)))
        .filter(|(p, _)| named.is_none_or(|n| n == p.name))
    {
        return format!(
            "{ip} is the first or last address of {}'s {}, kept back (allowFirstLastIPs: false)",
            pool.name, block.written
        );
    }
    match named {
        Some(name) => format!("{ip} is not in pool {name} ({ANNOTATION_IP_POOL})"),
        None => format!("{ip} is in no LoadBalancerIPPool{}", known_pools(pools)),
    }
}

/// Who holds which address during a pass: the claims (indices into the seniority order), in
/// the order they took it.
#[derive(Default)]
struct Ledger {
    holders: BTreeMap<IpAddr, Vec<usize>>,
}

impl Ledger {
    /// `Ok` when `claim` may hold `ip` too; else the first holder it may not share with.
    fn may_hold(&self, claims: &[&Claim], claim: usize, ip: IpAddr) -> Result<(), usize> {
        let holders = self.holders.get(&ip).into_iter().flatten();
        match holders
            .copied()
            .find(|h| *h != claim && !claims[claim].may_share_with(claims[*h]))
        {
            Some(holder) => Err(holder),
            None => Ok(()),
        }
    }

    fn hold(&mut self, claim: usize, ip: IpAddr) {
        let holders = self.holders.entry(ip).or_default();
        if !holders.contains(&claim) {
            holders.push(claim);
        }
    }

    fn release(&mut self, claim: usize, ips: &[IpAddr]) {
        for ip in ips {
            if let Some(holders) = self.holders.get_mut(ip) {
                holders.retain(|h| *h != claim);
                if holders.is_empty() {
                    self.holders.remove(ip);
                }
            }
        }
    }

    /// The lowest address of `block` nobody holds: a walk over the held addresses of the
    /// block only, never over the block's addresses (an IPv6 /64 has 2^64).
    fn lowest_free(&self, block: &AddressBlock) -> Option<IpAddr> {
        let mut candidate = block.first;
        for held in self
            .holders
            .range(block.first..=block.last)
            .map(|(ip, _)| *ip)
        {
            if held != candidate {
                break;
            }
            candidate = next(candidate)?;
        }
        (candidate <= block.last).then_some(candidate)
    }

    /// The lowest held address of `block` that `claim` may share.
    fn lowest_shareable(
        &self,
        claims: &[&Claim],
        claim: usize,
        block: &AddressBlock,
    ) -> Option<IpAddr> {
        self.holders
            .range(block.first..=block.last)
            .map(|(ip, _)| *ip)
            .find(|ip| self.may_hold(claims, claim, *ip).is_ok())
    }
}

/// A claim's standing during a pass.
#[derive(Default)]
struct Standing {
    /// The addresses it holds, one per family at most.
    held: Vec<IpAddr>,
    refusal: Option<Refusal>,
}

impl Standing {
    fn has(&self, family: IpFamily) -> bool {
        self.held.iter().any(|ip| IpFamily::of(*ip) == family)
    }
}

/// Decides every claim's addresses (see the module's rules). One [`Allocation`] per claim,
/// in namespace and name order; the same for any order of `pools` and `claims`.
///
/// A claim refused after it held addresses (kept ones, say, when the family it also requires
/// is exhausted) may have kept another claim from them; the pass is then run again without
/// it, so that every answer is one the others can live with: applying the result (assigned
/// addresses written, refused ones cleared) and allocating again gives the same result, except
/// that a claim refused for want of addresses that a later refusal freed is served then.
pub fn allocate(pools: &[Pool], claims: &[Claim]) -> Vec<Allocation> {
    let mut pools: Vec<&Pool> = pools.iter().collect();
    pools.sort();
    let mut order: Vec<&Claim> = claims.iter().collect();
    order.sort_by(|a, b| a.seniority().cmp(&b.seniority()));
    let mut excluded: BTreeMap<usize, Refusal> = BTreeMap::new();
    loop {
        let (standings, newly_excluded) = pass(&pools, &order, &excluded);
        if newly_excluded.is_empty() {
            let mut allocations: Vec<Allocation> = order
                .iter()
                .zip(standings)
                .map(|(claim, standing)| Allocation {
                    namespace: claim.namespace.clone(),
                    name: claim.name.clone(),
                    uid: claim.uid.clone(),
                    decision: match standing.refusal {
                        Some(Refusal { reason, message }) => Decision::Refused { reason, message },
                        None => {
                            let mut held = standing.held;
                            held.sort();
                            Decision::Assigned(held)
                        }
                    },
                })
                .collect();
            allocations.sort_by(|a, b| {
                (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid))
            });
            return allocations;
        }
        excluded.extend(newly_excluded);
    }
}

/// One pass over the claims in seniority order: current addresses, then requests, then new
/// choices. `excluded` claims are refused as recorded and hold nothing. Returns every claim's
/// standing, and the claims refused while holding addresses (to exclude in the next pass).
fn pass(
    pools: &[&Pool],
    claims: &[&Claim],
    excluded: &BTreeMap<usize, Refusal>,
) -> (Vec<Standing>, BTreeMap<usize, Refusal>) {
    let mut ledger = Ledger::default();
    let mut standings: Vec<Standing> = claims.iter().map(|_| Standing::default()).collect();
    let mut plans: Vec<Option<Plan>> = Vec::with_capacity(claims.len());
    for (i, claim) in claims.iter().enumerate() {
        let decided = match excluded.get(&i) {
            Some(refusal) => Err(refusal.clone()),
            None => plan(claim, pools),
        };
        match decided {
            Ok(plan) => plans.push(Some(plan)),
            Err(refusal) => {
                standings[i].refusal = Some(refusal);
                plans.push(None);
            }
        }
    }
    let mut newly_excluded = BTreeMap::new();
    let mut refuse = |i: usize, standing: &mut Standing, ledger: &mut Ledger, refusal: Refusal| {
        if !standing.held.is_empty() {
            newly_excluded.insert(i, refusal.clone());
        }
        ledger.release(i, &standing.held);
        standing.held.clear();
        standing.refusal = Some(refusal);
    };

    // Rule 2: current addresses, the oldest claim first.
    for (i, claim) in claims.iter().enumerate() {
        let Some(plan) = &plans[i] else { continue };
        for ip in &claim.current {
            let standing = &mut standings[i];
            if standing.has(IpFamily::of(*ip)) || !plan.may_keep(*ip) {
                continue;
            }
            if ledger.may_hold(claims, i, *ip).is_ok() {
                ledger.hold(i, *ip);
                standing.held.push(*ip);
            }
        }
    }

    // Rule 3: requests, before any new choice.
    for (i, claim) in claims.iter().enumerate() {
        let Some(plan) = &plans[i] else { continue };
        for (family, ip) in &plan.requested {
            let standing = &mut standings[i];
            if standing.refusal.is_some() || standing.has(*family) {
                continue;
            }
            match ledger.may_hold(claims, i, *ip) {
                Ok(()) => {
                    ledger.hold(i, *ip);
                    standing.held.push(*ip);
                }
                Err(holder) => {
                    let by = claims[holder].key();
                    let message = format!(
                        "{ip} is held by {by}; sharing it needs the same {ANNOTATION_ALLOW_SHARED_IP} \
                         key on both and no port in common (this Service: {})",
                        ports_text(claim)
                    );
                    refuse(
                        i,
                        standing,
                        &mut ledger,
                        Refusal::new(RefusalReason::InUse { by }, message),
                    );
                }
            }
        }
    }

    // Rule 4: new choices, per family still missing.
    for (i, claim) in claims.iter().enumerate() {
        let Some(plan) = &plans[i] else { continue };
        for family in &plan.families {
            let standing = &mut standings[i];
            if standing.refusal.is_some() || standing.has(*family) {
                continue;
            }
            let blocks = || plan.pools.iter().flat_map(|p| p.blocks_of(*family));
            let shared = claim
                .sharing_key
                .as_ref()
                .and_then(|_| blocks().find_map(|b| ledger.lowest_shareable(claims, i, b)));
            match shared.or_else(|| blocks().find_map(|b| ledger.lowest_free(b))) {
                Some(ip) => {
                    ledger.hold(i, ip);
                    standing.held.push(ip);
                }
                None if plan.all_required => {
                    let message = format!(
                        "no free {family} address in {}",
                        pool_list_text(&plan.pool_names(Some(*family)))
                    );
                    refuse(
                        i,
                        standing,
                        &mut ledger,
                        Refusal::new(RefusalReason::PoolExhausted, message),
                    );
                }
                // PreferDualStack: what can be had.
                None => {}
            }
        }
        let standing = &mut standings[i];
        if standing.refusal.is_none() && standing.held.is_empty() {
            let message = format!(
                "no free {} address in {}",
                plan.families
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(" or "),
                pool_list_text(&plan.pool_names(None))
            );
            refuse(
                i,
                standing,
                &mut ledger,
                Refusal::new(RefusalReason::PoolExhausted, message),
            );
        }
    }
    (standings, newly_excluded)
}

fn pool_list_text(names: &str) -> String {
    if names.contains(", ") {
        format!("pools {names}")
    } else {
        format!("pool {names}")
    }
}

fn ports_text(claim: &Claim) -> String {
    let ports: Vec<String> = claim.ports.iter().map(PortKey::to_string).collect();
    match &claim.sharing_key {
        Some(key) => format!("key {key:?}, ports {}", ports.join(" ")),
        None => "no key".into(),
    }
}

/// The merge patch (`application/merge-patch+json`, on the `status` subresource) that sets a
/// Service's `status.loadBalancer.ingress` to `assigned`; an empty list clears it.
pub fn status_patch(assigned: &[IpAddr]) -> serde_json::Value {
    let ingress: Vec<serde_json::Value> = assigned
        .iter()
        .map(|ip| serde_json::json!({ "ip": ip.to_string(), "ipMode": INGRESS_IP_MODE }))
        .collect();
    serde_json::json!({ "status": { "loadBalancer": { "ingress": ingress } } })
}

/// The addresses `service`'s `status.loadBalancer.ingress` shows (an entry that is not an
/// address, a hostname, is left out).
pub fn ingress_addresses(service: &Service) -> Vec<IpAddr> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
        .collect()
}

/// Whether `service`'s `status.loadBalancer.ingress` is ours to clear: it is not a claim
/// because it is no longer of type LoadBalancer (a type change leaves the status behind), and
/// it still shows an address of one of `pools`. A Service of another load balancer class is
/// never stale here: its status is its own implementation's.
pub fn stale_ingress(service: &Service, pools: &[Pool], class: &str) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    if spec.type_.as_deref() == Some("LoadBalancer")
        || spec
            .load_balancer_class
            .as_deref()
            .is_some_and(|c| c != class)
    {
        return false;
    }
    ingress_addresses(service)
        .into_iter()
        .any(|ip| pools.iter().any(|p| p.contains(ip)))
}

/// A pool's counts for its `status`: the distinct addresses of it that `allocations` assign,
/// and how many it can still hand out (saturating at `i64::MAX`).
pub fn pool_status(pool: &Pool, allocations: &[Allocation]) -> LoadBalancerIPPoolStatus {
    let assigned: BTreeSet<IpAddr> = allocations
        .iter()
        .flat_map(|a| a.ingress().iter().copied())
        .filter(|ip| pool.contains(*ip))
        .collect();
    let size = pool
        .blocks
        .iter()
        .fold(0u128, |total, b| total.saturating_add(b.size()));
    let count = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
    let assigned_count = assigned.len() as u128;
    LoadBalancerIPPoolStatus {
        assigned: Some(count(assigned_count)),
        free: Some(count(size.saturating_sub(assigned_count))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
        },
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;
    use crate::crd::LoadBalancerIPPoolSpec;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn ips(texts: &[&str]) -> Vec<IpAddr> {
        texts.iter().map(|t| ip(t)).collect()
    }

    /// A pool of `blocks` (CIDRs or START-STOP ranges), auto-assigning, first and last kept.
    fn pool(name: &str, blocks: &[&str]) -> Pool {
        let blocks = blocks
            .iter()
            .map(|text| match text.split_once('-') {
                Some((start, stop)) => AddressBlock::range(start, stop).unwrap(),
                None => AddressBlock::cidr(text, false).unwrap(),
            })
            .collect();
        Pool {
            name: name.into(),
            blocks,
            auto_assign: true,
            allow_first_last: false,
        }
    }

    fn manual(mut pool: Pool) -> Pool {
        pool.auto_assign = false;
        pool
    }

    /// A single-stack IPv4 claim `default/NAME` created at second `created`.
    fn claim(name: &str, created: i64) -> Claim {
        Claim {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            created: Some(Timestamp::from_second(created).unwrap()),
            families: vec![IpFamily::V4],
            ..Claim::default()
        }
    }

    fn dual(mut claim: Claim, policy: FamilyPolicy) -> Claim {
        claim.families = vec![IpFamily::V4, IpFamily::V6];
        claim.policy = policy;
        claim
    }

    fn v6(mut claim: Claim) -> Claim {
        claim.families = vec![IpFamily::V6];
        claim
    }

    fn current(mut claim: Claim, addresses: &[&str]) -> Claim {
        claim.current = ips(addresses);
        claim
    }

    fn requesting(mut claim: Claim, addresses: &[&str]) -> Claim {
        claim.requested = ips(addresses);
        claim
    }

    fn shared(mut claim: Claim, key: &str, ports: &[(u16, &str)]) -> Claim {
        claim.sharing_key = Some(key.into());
        claim.ports = ports
            .iter()
            .map(|(port, protocol)| PortKey {
                port: *port,
                protocol: (*protocol).into(),
            })
            .collect();
        claim
    }

    fn in_pool(mut claim: Claim, pool: &str) -> Claim {
        claim.pool = Some(pool.into());
        claim
    }

    /// Each claim's decision by name.
    fn decide(pools: &[Pool], claims: &[Claim]) -> BTreeMap<String, Decision> {
        allocate(pools, claims)
            .into_iter()
            .map(|a| (a.name, a.decision))
            .collect()
    }

    fn assigned(addresses: &[&str]) -> Decision {
        Decision::Assigned(ips(addresses))
    }

    fn reason(decision: &Decision) -> Option<&RefusalReason> {
        match decision {
            Decision::Refused { reason, .. } => Some(reason),
            Decision::Assigned(_) => None,
        }
    }

    fn message(decision: &Decision) -> &str {
        match decision {
            Decision::Refused { message, .. } => message,
            Decision::Assigned(_) => panic!("assigned: {decision:?}"),
        }
    }

    // --- Pools -------------------------------------------------------------------------------

    #[test]
    fn a_cidr_keeps_its_first_and_last_address_back_unless_allowed() {
        let block = AddressBlock::cidr("198.18.200.0/30", false).unwrap();
        assert_eq!(
            (block.first, block.last),
            (ip("198.18.200.1"), ip("198.18.200.2"))
        );
        assert_eq!(block.size(), 2);
        assert_eq!(block.kept_back, ips(&["198.18.200.0", "198.18.200.3"]));
        let block = AddressBlock::cidr("198.18.200.0/30", true).unwrap();
        assert_eq!(
            (block.first, block.last, block.size()),
            (ip("198.18.200.0"), ip("198.18.200.3"), 4)
        );
        // A /31 and a /32 have no network or broadcast address: handed out whole.
        assert_eq!(
            AddressBlock::cidr("198.18.200.0/31", false).unwrap().size(),
            2
        );
        assert_eq!(
            AddressBlock::cidr("198.18.200.7/32", false).unwrap().size(),
            1
        );
        // IPv6: the Subnet-Router anycast address (the first) is kept back, so the first
        // address handed out is ::1.
        let block = AddressBlock::cidr("2001:db8:200::/64", false).unwrap();
        assert_eq!(block.first, ip("2001:db8:200::1"));
        assert_eq!(block.last, ip("2001:db8:200:0:ffff:ffff:ffff:fffe"));
        assert_eq!(block.size(), (1u128 << 64) - 2);
        assert_eq!(
            AddressBlock::cidr("2001:db8::/127", false).unwrap().size(),
            2
        );
        assert_eq!(AddressBlock::cidr("::/0", true).unwrap().size(), u128::MAX);
        assert_eq!(
            AddressBlock::cidr("0.0.0.0/0", true).unwrap().size(),
            1 << 32
        );
    }

    #[test]
    fn blocks_that_are_not_addresses_are_refused_with_the_reason() {
        let cidr = |text| AddressBlock::cidr(text, false).unwrap_err();
        assert_eq!(
            cidr("198.18.300.0/24"),
            r#""198.18.300.0/24" is not a CIDR"#
        );
        assert_eq!(cidr("198.18.200.0"), r#""198.18.200.0" is not a CIDR"#);
        assert!(cidr("198.18.200.0/33").contains("prefix length is 0 to 32"));
        assert_eq!(
            cidr("198.18.200.5/24"),
            r#""198.18.200.5/24" has host bits set: the block would be 198.18.200.0/24"#
        );
        assert!(cidr("2001:db8::1/64").contains("2001:db8::/64"));
        let range = |start, stop| AddressBlock::range(start, stop).unwrap_err();
        assert_eq!(
            range("198.18.200.9", "198.18.200.1"),
            ("stop", "198.18.200.1 is below start 198.18.200.9".into())
        );
        assert_eq!(range("198.18.200.1", "2001:db8::1").0, "stop");
        assert!(
            range("198.18.200.1", "2001:db8::1")
                .1
                .contains("one family")
        );
        assert_eq!(range("nope", "198.18.200.1").0, "start");
    }

    fn resource(name: &str, blocks: Vec<PoolBlock>) -> LoadBalancerIPPool {
        LoadBalancerIPPool::new(
            name,
            LoadBalancerIPPoolSpec {
                blocks,
                auto_assign: true,
                allow_first_last_ips: false,
            },
        )
    }

    fn cidr_block(text: &str) -> PoolBlock {
        PoolBlock {
            cidr: Some(text.into()),
            ..PoolBlock::default()
        }
    }

    fn range_block(start: Option<&str>, stop: Option<&str>) -> PoolBlock {
        PoolBlock {
            cidr: None,
            start: start.map(Into::into),
            stop: stop.map(Into::into),
        }
    }

    #[test]
    fn a_pool_resource_converts_or_names_the_object_and_field() {
        let good = resource(
            "pool-a",
            vec![
                cidr_block("198.18.200.0/24"),
                range_block(Some("2001:db8:200::10"), Some("2001:db8:200::1f")),
            ],
        );
        let pool = Pool::from_resource(&good).unwrap();
        assert_eq!(pool.name, "pool-a");
        assert!(pool.auto_assign && !pool.allow_first_last);
        assert_eq!(pool.blocks.len(), 2);
        assert_eq!(pool.blocks[1].size(), 16);

        let error = |blocks| {
            Pool::from_resource(&resource("pool-a", blocks))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error(vec![
                cidr_block("198.18.200.0/24"),
                cidr_block("198.18.300.0/24")
            ]),
            r#"LoadBalancerIPPool pool-a: spec.blocks[1].cidr: "198.18.300.0/24" is not a CIDR"#
        );
        assert_eq!(
            error(vec![range_block(
                Some("198.18.200.9"),
                Some("198.18.200.1")
            )]),
            "LoadBalancerIPPool pool-a: spec.blocks[0].stop: 198.18.200.1 is below start 198.18.200.9"
        );
        assert_eq!(
            error(vec![range_block(Some("198.18.200.1"), None)]),
            "LoadBalancerIPPool pool-a: spec.blocks[0].stop: missing (start is given)"
        );
        let both = PoolBlock {
            cidr: Some("198.18.200.0/24".into()),
            start: Some("198.18.200.1".into()),
            stop: None,
        };
        assert!(
            error(vec![both]).starts_with("LoadBalancerIPPool pool-a: spec.blocks[0]: both cidr")
        );
        assert!(error(vec![PoolBlock::default()]).contains("spec.blocks[0]: empty"));
        assert!(error(vec![]).contains("spec.blocks: empty"));
        let mut unnamed = good.clone();
        unnamed.metadata.name = None;
        assert_eq!(
            Pool::from_resource(&unnamed).unwrap_err().to_string(),
            "LoadBalancerIPPool <unnamed>: metadata.name: missing"
        );
    }

    #[test]
    fn allow_first_last_ips_of_the_resource_reaches_its_cidr_blocks_only() {
        let mut object = resource(
            "p",
            vec![
                cidr_block("198.18.200.0/30"),
                range_block(Some("198.18.201.0"), Some("198.18.201.3")),
            ],
        );
        let sizes = |object: &LoadBalancerIPPool| -> Vec<u128> {
            Pool::from_resource(object)
                .unwrap()
                .blocks
                .iter()
                .map(AddressBlock::size)
                .collect()
        };
        assert_eq!(sizes(&object), [2, 4]);
        object.spec.allow_first_last_ips = true;
        assert_eq!(sizes(&object), [4, 4]);
    }

    #[test]
    fn an_ip_pool_flag_is_a_cidr_or_a_range() {
        let pool = Pool::from_flag(0, "198.18.200.0/24").unwrap();
        assert_eq!(pool.name, "flag-0");
        assert!(pool.auto_assign);
        assert_eq!(pool.blocks[0].first, ip("198.18.200.1"));
        let pool = Pool::from_flag(3, "198.18.200.10-198.18.200.20").unwrap();
        assert_eq!(pool.name, "flag-3");
        assert_eq!(pool.blocks[0].size(), 11);
        assert_eq!(
            Pool::from_flag(0, "198.18.300.0/24")
                .unwrap_err()
                .to_string(),
            r#"--ip-pool "198.18.300.0/24": "198.18.300.0/24" is not a CIDR"#
        );
        assert!(
            Pool::from_flag(0, "198.18.200.1")
                .unwrap_err()
                .to_string()
                .contains("expected a CIDR")
        );
        assert!(
            Pool::from_flag(0, "198.18.200.9-198.18.200.1")
                .unwrap_err()
                .to_string()
                .contains("stop: ")
        );
    }

    // --- Assignment --------------------------------------------------------------------------

    #[test]
    fn new_claims_get_the_lowest_free_addresses_by_seniority() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        // Input order says nothing: the older claim gets the lower address.
        let decisions = decide(&pools, &[claim("young", 20), claim("old", 10)]);
        assert_eq!(decisions["old"], assigned(&["198.18.200.1"]));
        assert_eq!(decisions["young"], assigned(&["198.18.200.2"]));
    }

    #[test]
    fn pools_are_tried_in_name_order_and_only_when_they_auto_assign() {
        let pools = [
            pool("b", &["198.18.201.0/24"]),
            manual(pool("a", &["198.18.200.0/24"])),
            pool("c", &["198.18.202.0/24"]),
        ];
        assert_eq!(
            decide(&pools, &[claim("s", 1)])["s"],
            assigned(&["198.18.201.1"])
        );
    }

    #[test]
    fn a_manual_pool_serves_requests_and_services_that_name_it() {
        let pools = [manual(pool("manual", &["198.18.200.0/24"]))];
        let decisions = decide(
            &pools,
            &[
                claim("asks-none", 1),
                requesting(claim("requests", 2), &["198.18.200.7"]),
                in_pool(claim("names", 3), "manual"),
            ],
        );
        assert_eq!(
            reason(&decisions["asks-none"]),
            Some(&RefusalReason::PoolExhausted)
        );
        assert!(
            message(&decisions["asks-none"]).contains(
                "no LoadBalancerIPPool hands out addresses automatically (pools: manual)"
            )
        );
        assert_eq!(decisions["requests"], assigned(&["198.18.200.7"]));
        assert_eq!(decisions["names"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn a_named_pool_is_the_only_one_used() {
        let pools = [
            pool("a", &["198.18.200.0/24"]),
            pool("b", &["198.18.201.0/24"]),
        ];
        let decisions = decide(
            &pools,
            &[
                in_pool(claim("in-b", 1), "b"),
                in_pool(claim("nowhere", 2), "missing"),
                in_pool(requesting(claim("asks-a-in-b", 3), &["198.18.200.9"]), "b"),
                in_pool(current(claim("moved-to-b", 4), &["198.18.200.1"]), "b"),
            ],
        );
        assert_eq!(decisions["in-b"], assigned(&["198.18.201.1"]));
        assert_eq!(
            reason(&decisions["nowhere"]),
            Some(&RefusalReason::UnknownPool)
        );
        assert_eq!(
            message(&decisions["nowhere"]),
            r#"pool "missing" (lb.xdp.rs/ip-pool) does not exist (pools: a, b)"#
        );
        assert_eq!(
            reason(&decisions["asks-a-in-b"]),
            Some(&RefusalReason::NotInAnyPool)
        );
        assert_eq!(
            message(&decisions["asks-a-in-b"]),
            "198.18.200.9 is not in pool b (lb.xdp.rs/ip-pool)"
        );
        // Its address of pool a is not in the pool it names now: it moves.
        assert_eq!(decisions["moved-to-b"], assigned(&["198.18.201.2"]));
    }

    #[test]
    fn a_slash_30_without_first_and_last_has_two_addresses() {
        let pools = [pool("tiny", &["198.18.200.0/30"])];
        let decisions = decide(&pools, &[claim("a", 1), claim("b", 2), claim("c", 3)]);
        assert_eq!(decisions["a"], assigned(&["198.18.200.1"]));
        assert_eq!(decisions["b"], assigned(&["198.18.200.2"]));
        assert_eq!(reason(&decisions["c"]), Some(&RefusalReason::PoolExhausted));
        assert_eq!(
            message(&decisions["c"]),
            "no free IPv4 address in pool tiny"
        );
        let two_pools = [
            pool("tiny", &["198.18.200.0/30"]),
            pool("other", &["198.18.201.0/32"]),
        ];
        let decisions = decide(
            &two_pools,
            &[claim("a", 1), claim("b", 2), claim("c", 3), claim("d", 4)],
        );
        assert_eq!(decisions["a"], assigned(&["198.18.201.0"]));
        assert_eq!(
            message(&decisions["d"]),
            "no free IPv4 address in pools other, tiny"
        );
    }

    #[test]
    fn ranges_are_handed_out_whole_and_in_order() {
        let pools = [pool(
            "r",
            &["198.18.200.12-198.18.200.13", "198.18.200.10-198.18.200.10"],
        )];
        let decisions = decide(
            &pools,
            &[claim("a", 1), claim("b", 2), claim("c", 3), claim("d", 4)],
        );
        assert_eq!(decisions["a"], assigned(&["198.18.200.10"]));
        assert_eq!(decisions["b"], assigned(&["198.18.200.12"]));
        assert_eq!(decisions["c"], assigned(&["198.18.200.13"]));
        assert_eq!(reason(&decisions["d"]), Some(&RefusalReason::PoolExhausted));
    }

    #[test]
    fn a_slash_64_is_walked_from_its_first_address_never_enumerated() {
        // 2^64 addresses: a list of them would never finish. 2,000 claims take the first 2,000.
        let pools = [pool("six", &["2001:db8:200::/64"])];
        let claims: Vec<Claim> = (0..2000)
            .map(|i| v6(claim(&format!("s{i:04}"), i)))
            .collect();
        let decisions = decide(&pools, &claims);
        assert_eq!(decisions["s0000"], assigned(&["2001:db8:200::1"]));
        assert_eq!(decisions["s1999"], assigned(&["2001:db8:200::7d0"]));
        // A hole below held addresses is found first.
        let holes = [
            v6(current(claim("a", 1), &["2001:db8:200::1"])),
            v6(current(claim("b", 2), &["2001:db8:200::3"])),
            v6(claim("new", 3)),
        ];
        assert_eq!(
            decide(&pools, &holes)["new"],
            assigned(&["2001:db8:200::2"])
        );
        // The very top of the IPv6 space: the walk stops at the end of the family.
        let top = [pool(
            "top",
            &["ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"],
        )];
        let decisions = decide(
            &top,
            &[v6(claim("a", 1)), v6(claim("b", 2)), v6(claim("c", 3))],
        );
        assert_eq!(
            decisions["b"],
            assigned(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])
        );
        assert_eq!(reason(&decisions["c"]), Some(&RefusalReason::PoolExhausted));
    }

    // --- Stability ---------------------------------------------------------------------------

    #[test]
    fn a_claim_keeps_its_current_address_even_with_lower_ones_free() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[current(claim("s", 5), &["198.18.200.77"]), claim("t", 1)],
        );
        assert_eq!(decisions["s"], assigned(&["198.18.200.77"]));
        assert_eq!(decisions["t"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn a_newcomer_never_takes_a_held_address_even_an_older_one_requesting_it() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                current(claim("holder", 50), &["198.18.200.1"]),
                // Older by creationTimestamp, yet new to the address: refused.
                requesting(claim("asker", 10), &["198.18.200.1"]),
                claim("newcomer", 5),
            ],
        );
        assert_eq!(decisions["holder"], assigned(&["198.18.200.1"]));
        assert_eq!(
            reason(&decisions["asker"]),
            Some(&RefusalReason::InUse {
                by: "default/holder".into()
            })
        );
        assert!(message(&decisions["asker"]).starts_with("198.18.200.1 is held by default/holder"));
        assert_eq!(decisions["newcomer"], assigned(&["198.18.200.2"]));
    }

    #[test]
    fn of_two_claims_showing_one_address_the_older_keeps_it() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                current(claim("young", 20), &["198.18.200.9"]),
                current(claim("old", 10), &["198.18.200.9"]),
            ],
        );
        assert_eq!(decisions["old"], assigned(&["198.18.200.9"]));
        assert_eq!(decisions["young"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn a_deleted_pool_moves_its_claims_to_the_remaining_pools() {
        let before = [
            pool("a", &["198.18.200.0/24"]),
            pool("b", &["198.18.201.0/24"]),
        ];
        let claims = [
            current(claim("s", 1), &["198.18.200.1"]),
            current(claim("t", 2), &["198.18.201.1"]),
        ];
        assert_eq!(decide(&before, &claims)["s"], assigned(&["198.18.200.1"]));
        let after = [pool("b", &["198.18.201.0/24"])];
        let decisions = decide(&after, &claims);
        assert_eq!(decisions["s"], assigned(&["198.18.201.2"]));
        assert_eq!(decisions["t"], assigned(&["198.18.201.1"]));
    }

    #[test]
    fn a_current_address_of_a_pool_that_stopped_auto_assigning_moves() {
        let claims = [current(claim("s", 1), &["198.18.200.1"])];
        let pools = [
            manual(pool("a", &["198.18.200.0/24"])),
            pool("b", &["198.18.201.0/24"]),
        ];
        assert_eq!(decide(&pools, &claims)["s"], assigned(&["198.18.201.1"]));
    }

    #[test]
    fn a_changed_request_replaces_the_current_address() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                requesting(current(claim("s", 1), &["198.18.200.5"]), &["198.18.200.9"]),
                claim("t", 2),
            ],
        );
        assert_eq!(decisions["s"], assigned(&["198.18.200.9"]));
        assert_eq!(decisions["t"], assigned(&["198.18.200.1"]));
    }

    // --- Requests ----------------------------------------------------------------------------

    #[test]
    fn a_requested_address_outside_every_pool_is_refused_naming_it() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                requesting(claim("outside", 1), &["203.0.113.7"]),
                requesting(claim("network", 2), &["198.18.200.0"]),
            ],
        );
        assert_eq!(
            reason(&decisions["outside"]),
            Some(&RefusalReason::NotInAnyPool)
        );
        assert_eq!(
            message(&decisions["outside"]),
            "203.0.113.7 is in no LoadBalancerIPPool (pools: a)"
        );
        assert_eq!(
            message(&decisions["network"]),
            "198.18.200.0 is the first or last address of a's 198.18.200.0/24, kept back (allowFirstLastIPs: false)"
        );
        let decisions = decide(&[], &[requesting(claim("no-pools", 1), &["203.0.113.7"])]);
        assert_eq!(
            message(&decisions["no-pools"]),
            "203.0.113.7 is in no LoadBalancerIPPool (there is no pool)"
        );
    }

    #[test]
    fn requests_are_served_before_new_choices() {
        // The older claim asks for nothing; the younger one asks for the lowest address.
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                claim("old", 1),
                requesting(claim("young", 2), &["198.18.200.1"]),
            ],
        );
        assert_eq!(decisions["young"], assigned(&["198.18.200.1"]));
        assert_eq!(decisions["old"], assigned(&["198.18.200.2"]));
    }

    #[test]
    fn two_requests_for_one_address_go_to_the_older() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                requesting(claim("young", 2), &["198.18.200.5"]),
                requesting(claim("old", 1), &["198.18.200.5"]),
            ],
        );
        assert_eq!(decisions["old"], assigned(&["198.18.200.5"]));
        assert_eq!(
            reason(&decisions["young"]),
            Some(&RefusalReason::InUse {
                by: "default/old".into()
            })
        );
    }

    // --- Sharing -----------------------------------------------------------------------------

    #[test]
    fn same_key_and_disjoint_ports_share_an_address() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                shared(claim("dns-tcp", 1), "dns", &[(53, "TCP")]),
                shared(claim("dns-udp", 2), "dns", &[(53, "UDP")]),
            ],
        );
        assert_eq!(decisions["dns-tcp"], assigned(&["198.18.200.1"]));
        assert_eq!(decisions["dns-udp"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn overlapping_ports_different_keys_or_no_key_do_not_share() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                shared(claim("web", 1), "k", &[(80, "TCP"), (443, "TCP")]),
                shared(claim("overlap", 2), "k", &[(443, "TCP")]),
                shared(claim("other-key", 3), "j", &[(8080, "TCP")]),
                claim("no-key", 4),
                // Joins web's address: same key, its ports are neither web's nor overlap's.
                shared(claim("joins", 5), "k", &[(8443, "TCP")]),
            ],
        );
        assert_eq!(decisions["web"], assigned(&["198.18.200.1"]));
        assert_eq!(decisions["overlap"], assigned(&["198.18.200.2"]));
        assert_eq!(decisions["other-key"], assigned(&["198.18.200.3"]));
        assert_eq!(decisions["no-key"], assigned(&["198.18.200.4"]));
        assert_eq!(decisions["joins"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn a_requested_address_is_shared_only_when_sharing_allows() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let decisions = decide(
            &pools,
            &[
                shared(
                    requesting(claim("first", 1), &["198.18.200.9"]),
                    "k",
                    &[(80, "TCP")],
                ),
                shared(
                    requesting(claim("fits", 2), &["198.18.200.9"]),
                    "k",
                    &[(81, "TCP")],
                ),
                shared(
                    requesting(claim("clashes", 3), &["198.18.200.9"]),
                    "k",
                    &[(81, "TCP")],
                ),
                requesting(claim("keyless", 4), &["198.18.200.9"]),
            ],
        );
        assert_eq!(decisions["first"], assigned(&["198.18.200.9"]));
        assert_eq!(decisions["fits"], assigned(&["198.18.200.9"]));
        // The first holder it may not share with is named: `fits` (port 81 in common).
        assert_eq!(
            reason(&decisions["clashes"]),
            Some(&RefusalReason::InUse {
                by: "default/fits".into()
            })
        );
        assert_eq!(
            reason(&decisions["keyless"]),
            Some(&RefusalReason::InUse {
                by: "default/first".into()
            })
        );
    }

    #[test]
    fn a_shared_address_is_kept_by_all_its_claims() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let claims = [
            shared(
                current(claim("x", 1), &["198.18.200.4"]),
                "k",
                &[(80, "TCP")],
            ),
            shared(
                current(claim("y", 2), &["198.18.200.4"]),
                "k",
                &[(81, "TCP")],
            ),
            // Showing it too, but without the key: it moves.
            current(claim("z", 3), &["198.18.200.4"]),
        ];
        let decisions = decide(&pools, &claims);
        assert_eq!(decisions["x"], assigned(&["198.18.200.4"]));
        assert_eq!(decisions["y"], assigned(&["198.18.200.4"]));
        assert_eq!(decisions["z"], assigned(&["198.18.200.1"]));
    }

    // --- Families ----------------------------------------------------------------------------

    #[test]
    fn prefer_dual_stack_takes_what_the_pools_have() {
        let v4_only = [pool("a", &["198.18.200.0/24"])];
        let both = [
            pool("a", &["198.18.200.0/24"]),
            pool("b", &["2001:db8:200::/64"]),
        ];
        let prefer = dual(claim("s", 1), FamilyPolicy::PreferDualStack);
        assert_eq!(
            decide(&v4_only, std::slice::from_ref(&prefer))["s"],
            assigned(&["198.18.200.1"])
        );
        assert_eq!(
            decide(&both, std::slice::from_ref(&prefer))["s"],
            assigned(&["198.18.200.1", "2001:db8:200::1"])
        );
        // IPv6 primary: still IPv4 first in the ingress list.
        let mut v6_first = prefer.clone();
        v6_first.families = vec![IpFamily::V6, IpFamily::V4];
        assert_eq!(
            decide(&both, &[v6_first])["s"],
            assigned(&["198.18.200.1", "2001:db8:200::1"])
        );
        // One family exhausted: the other one is had.
        let full = [
            pool("a", &["198.18.200.1/32"]),
            pool("b", &["2001:db8:200::/64"]),
        ];
        let decisions = decide(&full, &[claim("first", 0), prefer.clone()]);
        assert_eq!(decisions["s"], assigned(&["2001:db8:200::1"]));
        // Nothing at all: refused.
        let decisions = decide(
            &[pool("a", &["198.18.200.1/32"])],
            &[claim("first", 0), prefer],
        );
        assert_eq!(reason(&decisions["s"]), Some(&RefusalReason::PoolExhausted));
    }

    #[test]
    fn require_dual_stack_gets_both_families_or_nothing() {
        let v4_only = [pool("a", &["198.18.200.0/24"])];
        let require = dual(claim("s", 1), FamilyPolicy::RequireDualStack);
        let decisions = decide(&v4_only, std::slice::from_ref(&require));
        assert_eq!(
            reason(&decisions["s"]),
            Some(&RefusalReason::FamilyUnavailable)
        );
        assert_eq!(
            message(&decisions["s"]),
            "no IPv6 addresses in pool a (the Service's ipFamilyPolicy is RequireDualStack)"
        );
        let both = [
            pool("a", &["198.18.200.0/24"]),
            pool("b", &["2001:db8:200::/64"]),
        ];
        assert_eq!(
            decide(&both, std::slice::from_ref(&require))["s"],
            assigned(&["198.18.200.1", "2001:db8:200::1"])
        );
        // IPv6 exhausted: refused, and its IPv4 address stays free for the next claim.
        let v6_full = [
            pool("a", &["198.18.200.0/24"]),
            pool("b", &["2001:db8:200::1/128"]),
        ];
        let decisions = decide(&v6_full, &[v6(claim("v6", 0)), require, claim("next", 2)]);
        assert_eq!(reason(&decisions["s"]), Some(&RefusalReason::PoolExhausted));
        assert_eq!(message(&decisions["s"]), "no free IPv6 address in pool b");
        assert_eq!(decisions["next"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn a_refused_claim_gives_back_the_addresses_it_kept() {
        // `s` keeps its IPv4 address, then finds no IPv6 one: refused. `next`, older, was
        // looking for an address before `s` was refused; it gets the one `s` gave back in the
        // same call, not one call later.
        let pools = [
            pool("a", &["198.18.200.1/32"]),
            pool("b", &["2001:db8:200::1/128"]),
        ];
        let claims = [
            v6(current(claim("v6-holder", 0), &["2001:db8:200::1"])),
            claim("next", 1),
            current(
                dual(claim("s", 2), FamilyPolicy::RequireDualStack),
                &["198.18.200.1"],
            ),
        ];
        let decisions = decide(&pools, &claims);
        assert_eq!(reason(&decisions["s"]), Some(&RefusalReason::PoolExhausted));
        assert_eq!(decisions["next"], assigned(&["198.18.200.1"]));
    }

    #[test]
    fn a_request_of_a_family_the_service_has_not_is_invalid() {
        let pools = [pool("a", &["198.18.200.0/24", "2001:db8:200::/64"])];
        let decisions = decide(
            &pools,
            &[
                requesting(claim("v6-for-v4", 1), &["2001:db8:200::5"]),
                requesting(claim("two-v4", 2), &["198.18.200.5", "198.18.200.6"]),
                // A dual-stack request with one address: the other family is chosen.
                requesting(
                    dual(claim("half", 3), FamilyPolicy::RequireDualStack),
                    &["2001:db8:200::9"],
                ),
            ],
        );
        assert_eq!(
            reason(&decisions["v6-for-v4"]),
            Some(&RefusalReason::InvalidRequest)
        );
        assert_eq!(
            reason(&decisions["two-v4"]),
            Some(&RefusalReason::InvalidRequest)
        );
        assert_eq!(
            decisions["half"],
            assigned(&["198.18.200.1", "2001:db8:200::9"])
        );
    }

    // --- Determinism -------------------------------------------------------------------------

    /// A small deterministic shuffle (no dependency for one test).
    fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
        let mut items = items.to_vec();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for i in (1..items.len()).rev() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            items.swap(i, j);
        }
        items
    }

    /// Pools and claims exercising every rule at once.
    fn scenario() -> (Vec<Pool>, Vec<Claim>) {
        let pools = vec![
            pool("a", &["198.18.200.0/29"]),
            pool("b", &["198.18.201.10-198.18.201.12", "2001:db8:200::/64"]),
            manual(pool("m", &["198.18.202.0/24"])),
            pool("z", &["2001:db8:300::/126"]),
        ];
        let mut claims = vec![
            current(claim("keeper", 40), &["198.18.200.3"]),
            requesting(claim("asks-held", 1), &["198.18.200.3"]),
            requesting(claim("asks-manual", 30), &["198.18.202.50"]),
            in_pool(claim("names-m", 31), "m"),
            dual(claim("prefers", 5), FamilyPolicy::PreferDualStack),
            dual(claim("requires", 6), FamilyPolicy::RequireDualStack),
            shared(claim("share-1", 7), "k", &[(80, "TCP")]),
            shared(claim("share-2", 8), "k", &[(443, "TCP")]),
            shared(claim("share-3", 9), "k", &[(80, "TCP")]),
            v6(claim("six", 10)),
            requesting(claim("outside", 11), &["192.0.2.1"]),
            in_pool(claim("unknown", 12), "nope"),
        ];
        // Same creationTimestamp: namespace and name decide.
        for i in 0..12 {
            let mut c = claim(&format!("same-{i:02}"), 50);
            c.namespace = format!("ns-{}", 11 - i);
            claims.push(c);
        }
        let mut untimed = claim("untimed", 0);
        untimed.created = None;
        claims.push(untimed);
        (pools, claims)
    }

    #[test]
    fn the_result_does_not_depend_on_the_order_of_pools_or_claims() {
        let (pools, claims) = scenario();
        let expected = allocate(&pools, &claims);
        // Some were assigned, some refused, some exhausted: the scenario is not trivial.
        assert!(
            expected
                .iter()
                .any(|a| matches!(a.decision, Decision::Assigned(_)))
        );
        assert!(
            expected
                .iter()
                .any(|a| reason(&a.decision) == Some(&RefusalReason::PoolExhausted))
        );
        for seed in 0..50 {
            let got = allocate(&shuffled(&pools, seed), &shuffled(&claims, seed + 1000));
            assert_eq!(got, expected, "seed {seed}");
        }
    }

    #[test]
    fn applying_the_result_and_allocating_again_changes_nothing() {
        let (pools, mut claims) = scenario();
        let first = allocate(&pools, &claims);
        for claim in &mut claims {
            let allocation = first
                .iter()
                .find(|a| a.name == claim.name && a.namespace == claim.namespace)
                .unwrap();
            claim.current = allocation.ingress().to_vec();
        }
        assert_eq!(allocate(&pools, &claims), first);
    }

    #[test]
    fn allocations_are_in_namespace_and_name_order() {
        let (pools, claims) = scenario();
        let names: Vec<(String, String)> = allocate(&pools, &claims)
            .into_iter()
            .map(|a| (a.namespace, a.name))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), claims.len());
    }

    // --- Services ----------------------------------------------------------------------------

    fn service(type_: &str, class: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                creation_timestamp: Some(Time(Timestamp::from_second(100).unwrap())),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                load_balancer_class: class.map(Into::into),
                ports: Some(vec![
                    ServicePort {
                        port: 80,
                        ..ServicePort::default()
                    },
                    ServicePort {
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..ServicePort::default()
                    },
                ]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    const CLASS: &str = "lb.xdp.rs/xdp";

    #[test]
    fn only_load_balancer_services_of_our_class_or_none_are_claims() {
        assert!(Claim::from_service(&service("ClusterIP", None), CLASS).is_none());
        assert!(Claim::from_service(&service("NodePort", None), CLASS).is_none());
        assert!(
            Claim::from_service(&service("LoadBalancer", Some("example.com/other")), CLASS)
                .is_none()
        );
        assert!(Claim::from_service(&service("LoadBalancer", Some(CLASS)), CLASS).is_some());
        let claim = Claim::from_service(&service("LoadBalancer", None), CLASS).unwrap();
        assert_eq!(
            (
                claim.namespace.as_str(),
                claim.name.as_str(),
                claim.uid.as_str()
            ),
            ("shop", "web", "u-1")
        );
        assert_eq!(claim.created, Some(Timestamp::from_second(100).unwrap()));
        assert_eq!(
            (claim.families.as_slice(), claim.policy),
            ([IpFamily::V4].as_slice(), FamilyPolicy::SingleStack)
        );
        let ports: Vec<String> = claim.ports.iter().map(PortKey::to_string).collect();
        assert_eq!(ports, ["53/UDP", "80/TCP"]);
        assert_eq!(claim.invalid, None);
        let mut nameless = service("LoadBalancer", None);
        nameless.metadata.name = None;
        assert!(Claim::from_service(&nameless, CLASS).is_none());
    }

    #[test]
    fn a_service_is_read_with_its_families_requests_annotations_and_status() {
        let mut svc = service("LoadBalancer", None);
        let spec = svc.spec.as_mut().unwrap();
        spec.ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        spec.ip_family_policy = Some("PreferDualStack".into());
        spec.load_balancer_ip = Some("198.18.200.7".into());
        svc.metadata.annotations = Some(BTreeMap::from([
            (
                ANNOTATION_LOAD_BALANCER_IPS.into(),
                "198.18.200.7, 2001:db8:200::7".into(),
            ),
            (ANNOTATION_IP_POOL.into(), " pool-a ".into()),
            (ANNOTATION_ALLOW_SHARED_IP.into(), "shop".into()),
        ]));
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("198.18.200.7".into()),
                        ..LoadBalancerIngress::default()
                    },
                    LoadBalancerIngress {
                        hostname: Some("lb.example.com".into()),
                        ..LoadBalancerIngress::default()
                    },
                ]),
            }),
            ..ServiceStatus::default()
        });
        let claim = Claim::from_service(&svc, CLASS).unwrap();
        assert_eq!(claim.families, [IpFamily::V6, IpFamily::V4]);
        assert_eq!(claim.policy, FamilyPolicy::PreferDualStack);
        assert_eq!(claim.requested, ips(&["198.18.200.7", "2001:db8:200::7"]));
        assert_eq!(claim.pool.as_deref(), Some("pool-a"));
        assert_eq!(claim.sharing_key.as_deref(), Some("shop"));
        assert_eq!(claim.current, ips(&["198.18.200.7"]));
        assert_eq!(claim.invalid, None);
    }

    #[test]
    fn a_service_with_an_unusable_request_is_a_claim_refused_as_invalid() {
        let read = |edit: &dyn Fn(&mut Service)| {
            let mut svc = service("LoadBalancer", None);
            edit(&mut svc);
            Claim::from_service(&svc, CLASS).unwrap().invalid
        };
        let annotate = |value: &str| {
            let value = value.to_owned();
            move |svc: &mut Service| {
                svc.metadata.annotations = Some(BTreeMap::from([(
                    ANNOTATION_LOAD_BALANCER_IPS.into(),
                    value.clone(),
                )]));
            }
        };
        assert_eq!(
            read(&|s| s.spec.as_mut().unwrap().load_balancer_ip = Some("198.18.300.1".into()))
                .as_deref(),
            Some(r#"spec.loadBalancerIP: "198.18.300.1" is not an IP address"#)
        );
        assert!(
            read(&annotate("198.18.200.1,198.18.200.2"))
                .unwrap()
                .contains("at most one address per family")
        );
        assert!(
            read(&annotate("2001:db8::1"))
                .unwrap()
                .contains("is IPv6, and the Service's families are [IPv4]")
        );
        assert!(
            read(&|s| s.spec.as_mut().unwrap().ip_family_policy = Some("Dual".into()))
                .unwrap()
                .contains("spec.ipFamilyPolicy")
        );
        // The same address twice (field and annotation) is one request.
        assert_eq!(
            read(&|s| {
                annotate("198.18.200.1")(s);
                s.spec.as_mut().unwrap().load_balancer_ip = Some("198.18.200.1".into());
            }),
            None
        );
        let mut svc = service("LoadBalancer", None);
        svc.spec.as_mut().unwrap().load_balancer_ip = Some("nope".into());
        let claim = Claim::from_service(&svc, CLASS).unwrap();
        let decisions = allocate(&[pool("a", &["198.18.200.0/24"])], &[claim]);
        assert_eq!(
            reason(&decisions[0].decision),
            Some(&RefusalReason::InvalidRequest)
        );
    }

    #[test]
    fn families_default_from_the_cluster_ips_and_the_policy() {
        let families =
            |policy: Option<&str>, listed: Option<Vec<&str>>, cluster_ip: Option<&str>| {
                let mut svc = service("LoadBalancer", None);
                let spec = svc.spec.as_mut().unwrap();
                spec.ip_family_policy = policy.map(Into::into);
                spec.ip_families = listed.map(|l| l.into_iter().map(Into::into).collect());
                spec.cluster_ip = cluster_ip.map(Into::into);
                Claim::from_service(&svc, CLASS).unwrap().families
            };
        use IpFamily::{V4, V6};
        assert_eq!(families(None, None, None), [V4]);
        assert_eq!(families(None, None, Some("fd00::10")), [V6]);
        assert_eq!(
            families(Some("SingleStack"), Some(vec!["IPv6", "IPv4"]), None),
            [V6]
        );
        assert_eq!(
            families(Some("PreferDualStack"), Some(vec!["IPv4"]), None),
            [V4]
        );
        assert_eq!(
            families(Some("PreferDualStack"), Some(vec!["IPv4", "IPv6"]), None),
            [V4, V6]
        );
        assert_eq!(
            families(Some("RequireDualStack"), Some(vec!["IPv6"]), None),
            [V6, V4]
        );
    }

    #[test]
    fn stale_ingress_is_a_pool_address_left_on_a_service_that_is_no_longer_a_load_balancer() {
        let pools = [pool("a", &["198.18.200.0/24"])];
        let with_ingress = |type_: &str, class: Option<&str>, address: &str| {
            let mut svc = service(type_, class);
            svc.status = Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some(address.into()),
                        ..LoadBalancerIngress::default()
                    }]),
                }),
                ..ServiceStatus::default()
            });
            svc
        };
        assert!(stale_ingress(
            &with_ingress("ClusterIP", None, "198.18.200.4"),
            &pools,
            CLASS
        ));
        assert!(!stale_ingress(
            &with_ingress("ClusterIP", None, "203.0.113.4"),
            &pools,
            CLASS
        ));
        assert!(!stale_ingress(
            &with_ingress("LoadBalancer", None, "198.18.200.4"),
            &pools,
            CLASS
        ));
        // Another implementation's Service: its status is not ours, even in our pools.
        assert!(!stale_ingress(
            &with_ingress("LoadBalancer", Some("example.com/other"), "198.18.200.4"),
            &pools,
            CLASS
        ));
        assert!(!stale_ingress(&service("ClusterIP", None), &pools, CLASS));
    }

    #[test]
    fn the_status_patch_writes_the_ingress_list_or_clears_it() {
        assert_eq!(
            status_patch(&ips(&["198.18.200.1", "2001:db8:200::1"])),
            serde_json::json!({"status": {"loadBalancer": {"ingress": [
                {"ip": "198.18.200.1", "ipMode": "VIP"},
                {"ip": "2001:db8:200::1", "ipMode": "VIP"},
            ]}}})
        );
        assert_eq!(
            status_patch(&[]),
            serde_json::json!({"status": {"loadBalancer": {"ingress": []}}})
        );
    }

    #[test]
    fn pool_status_counts_assigned_and_free_addresses() {
        let pools = [
            pool("tiny", &["198.18.200.0/30"]),
            pool("six", &["2001:db8:200::/64"]),
        ];
        let claims = [
            shared(claim("a", 1), "k", &[(80, "TCP")]),
            shared(claim("b", 2), "k", &[(81, "TCP")]),
            v6(claim("c", 3)),
        ];
        let allocations = allocate(&pools, &claims);
        assert_eq!(
            pool_status(&pools[0], &allocations),
            LoadBalancerIPPoolStatus {
                assigned: Some(1),
                free: Some(1)
            }
        );
        assert_eq!(
            pool_status(&pools[1], &allocations),
            LoadBalancerIPPoolStatus {
                assigned: Some(1),
                free: Some(i64::MAX)
            }
        );
    }

    #[test]
    fn refusal_reasons_have_event_reasons() {
        assert_eq!(
            RefusalReason::InUse { by: "a/b".into() }.event_reason(),
            "AddressInUse"
        );
        assert_eq!(
            RefusalReason::NotInAnyPool.event_reason(),
            "AddressNotInAnyPool"
        );
    }
}
