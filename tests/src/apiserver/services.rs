//! What the API server adds to a Service on create and update: defaults, cluster IPs from the
//! service CIDRs (198.19.0.0/16, and 2001:db8:ffff::/112 for IPv6) and node ports from
//! 30000-32767, kept across updates that omit them (as a client that read-modify-writes does).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value, json};

use super::object::field_object_mut;

/// The IPv4 service CIDR, 198.19.0.0/16.
const IPV4_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const IPV4_SIZE: u32 = 1 << 16;
/// The IPv6 service CIDR, 2001:db8:ffff::/112.
const IPV6_BASE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0);
const IPV6_SIZE: u32 = 1 << 16;
/// The default `--service-node-port-range`.
const NODE_PORT_FIRST: u16 = 30000;
const NODE_PORT_LAST: u16 = 32767;

/// A field the real server's validation would refuse, and why.
#[derive(Debug)]
pub(super) struct Invalid {
    pub field: String,
    pub detail: String,
}

/// Where the next allocations start (the real server picks at random; a counter is easier to
/// read in a test's output, and still skips what is taken).
#[derive(Debug)]
pub(super) struct Allocator {
    next_ipv4: u32,
    next_ipv6: u32,
    next_node_port: u16,
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator {
            next_ipv4: 1,
            next_ipv6: 1,
            next_node_port: NODE_PORT_FIRST,
        }
    }
}

/// Cluster IPs and node ports held by the other Services.
struct Taken {
    ips: HashSet<IpAddr>,
    node_ports: HashSet<u16>,
}

impl Taken {
    fn of<'a>(others: impl Iterator<Item = &'a Value>) -> Self {
        let mut taken = Taken {
            ips: HashSet::new(),
            node_ports: HashSet::new(),
        };
        for spec in others.filter_map(|s| s.get("spec")) {
            taken
                .ips
                .extend(strings(spec.get("clusterIPs")).filter_map(|ip| ip.parse::<IpAddr>().ok()));
            taken.node_ports.extend(node_ports(spec));
        }
        taken
    }
}

/// Strings of a JSON array (nothing if it is not one).
fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Every node port a Service spec holds (its ports' and the health check's).
fn node_ports(spec: &Value) -> impl Iterator<Item = u16> + '_ {
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort"));
    ports
        .chain(spec.get("healthCheckNodePort"))
        .filter_map(Value::as_u64)
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// Unset as the API server's defaulting sees it: missing, null, "" or [].
fn unset(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Number(n)) => n.as_u64() == Some(0),
        _ => false,
    }
}

fn default_to(spec: &mut Map<String, Value>, field: &str, value: Value) {
    if unset(spec.get(field)) {
        spec.insert(field.to_string(), value);
    }
}

fn str_of<'a>(spec: &'a Map<String, Value>, field: &str) -> &'a str {
    spec.get(field).and_then(Value::as_str).unwrap_or("")
}

fn family_of(ip: &str) -> Option<&'static str> {
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(_) => Some("IPv4"),
        IpAddr::V6(_) => Some("IPv6"),
    }
}

fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        detail: detail.into(),
    }
}

impl Allocator {
    fn cluster_ip(&mut self, family: &str, taken: &HashSet<IpAddr>) -> Result<IpAddr, Invalid> {
        // Offsets 1 to size-2: the network and last addresses are never handed out.
        let full = || invalid("spec.clusterIPs", "Internal error: range is full");
        for _ in 0..IPV4_SIZE {
            let candidate = if family == "IPv6" {
                let offset = self.next_ipv6;
                self.next_ipv6 = offset % (IPV6_SIZE - 2) + 1;
                IpAddr::V6(Ipv6Addr::from(u128::from(IPV6_BASE) + u128::from(offset)))
            } else {
                let offset = self.next_ipv4;
                self.next_ipv4 = offset % (IPV4_SIZE - 2) + 1;
                IpAddr::V4(Ipv4Addr::from(u32::from(IPV4_BASE) + offset))
            };
            if !taken.contains(&candidate) {
                return Ok(candidate);
            }
        }
        Err(full())
    }

    fn node_port(&mut self, taken: &HashSet<u16>) -> Result<u16, Invalid> {
        for _ in NODE_PORT_FIRST..=NODE_PORT_LAST {
            let candidate = self.next_node_port;
            self.next_node_port = if candidate == NODE_PORT_LAST {
                NODE_PORT_FIRST
            } else {
                candidate + 1
            };
            if !taken.contains(&candidate) {
                return Ok(candidate);
            }
        }
        Err(invalid("spec.ports", "Internal error: range is full"))
    }
}

/// Fills in what the API server adds to `service` (create: `old` is `None`; update: `old` is
/// the stored object). `others` are the other stored Services (what they hold is taken).
pub(super) fn apply_defaults<'a>(
    service: &mut Value,
    old: Option<&Value>,
    others: impl Iterator<Item = &'a Value>,
    allocator: &mut Allocator,
) -> Result<(), Invalid> {
    let mut taken = Taken::of(others);
    let old_spec = old.and_then(|o| o.get("spec"));
    let spec = field_object_mut(service, "spec");
    default_to(spec, "type", json!("ClusterIP"));
    default_to(spec, "sessionAffinity", json!("None"));
    let service_type = str_of(spec, "type").to_string();

    if service_type == "ExternalName" {
        // A name, not an address: nothing allocated, nothing to route.
        for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            spec.remove(field);
        }
    } else {
        keep_allocated(
            spec,
            old_spec,
            &["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"],
        );
        cluster_ips(spec, allocator, &taken)?;
        default_to(spec, "internalTrafficPolicy", json!("Cluster"));
    }

    let mine = ports(spec, old_spec, &service_type, allocator, &mut taken)?;
    if service_type == "LoadBalancer" && str_of(spec, "externalTrafficPolicy") == "Local" {
        keep_allocated(spec, old_spec, &["healthCheckNodePort"]);
        if unset(spec.get("healthCheckNodePort")) {
            taken.node_ports.extend(mine);
            let port = allocator.node_port(&taken.node_ports)?;
            spec.insert("healthCheckNodePort".into(), json!(port));
        }
    } else {
        spec.remove("healthCheckNodePort");
    }

    let status = field_object_mut(service, "status");
    status
        .entry("loadBalancer")
        .or_insert_with(|| Value::Object(Map::new()));
    Ok(())
}

/// Copies `fields` from the stored spec where the update leaves them unset.
fn keep_allocated(spec: &mut Map<String, Value>, old_spec: Option<&Value>, fields: &[&str]) {
    let Some(old_spec) = old_spec else { return };
    if old_spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
        return;
    }
    for field in fields {
        if unset(spec.get(*field))
            && let Some(value) = old_spec.get(*field).filter(|v| !unset(Some(v)))
        {
            spec.insert(field.to_string(), value.clone());
        }
    }
}

/// IP families, the family policy, and one cluster IP per family.
fn cluster_ips(
    spec: &mut Map<String, Value>,
    allocator: &mut Allocator,
    taken: &Taken,
) -> Result<(), Invalid> {
    let headless = str_of(spec, "clusterIP") == "None"
        || strings(spec.get("clusterIPs")).next() == Some("None");
    let selectorless = spec
        .get("selector")
        .and_then(Value::as_object)
        .is_none_or(Map::is_empty);
    // A headless Service without a selector gets every family of the cluster.
    let policy_default = if headless && selectorless {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    default_to(spec, "ipFamilyPolicy", json!(policy_default));
    let policy = str_of(spec, "ipFamilyPolicy").to_string();

    let mut ips: Vec<String> = strings(spec.get("clusterIPs"))
        .map(str::to_string)
        .collect();
    let cluster_ip = str_of(spec, "clusterIP").to_string();
    if ips.is_empty() && !cluster_ip.is_empty() {
        ips.push(cluster_ip.clone());
    }
    if !cluster_ip.is_empty() && ips.first() != Some(&cluster_ip) {
        return Err(invalid(
            "spec.clusterIPs[0]",
            format!(
                "Invalid value: {:?}: must match clusterIP when clusterIP is set",
                ips.first().map_or("", String::as_str)
            ),
        ));
    }

    let mut families: Vec<String> = strings(spec.get("ipFamilies"))
        .map(str::to_string)
        .collect();
    if families.is_empty() {
        families = ips
            .iter()
            .filter_map(|ip| family_of(ip))
            .map(String::from)
            .collect();
    }
    if families.is_empty() {
        families.push("IPv4".into());
    }
    if policy != "SingleStack" && families.len() == 1 {
        let other = if families.first().map(String::as_str) == Some("IPv4") {
            "IPv6"
        } else {
            "IPv4"
        };
        families.push(other.into());
    }
    if policy == "SingleStack" && families.len() > 1 {
        return Err(invalid(
            "spec.ipFamilies",
            format!(
                "Invalid value: {families:?}: when spec.ipFamilyPolicy is SingleStack, only one family may be given"
            ),
        ));
    }

    if headless {
        ips = vec!["None".into()];
    } else {
        for (index, ip) in ips.iter().enumerate() {
            let field = format!("spec.clusterIPs[{index}]");
            let parsed: IpAddr = ip.parse().map_err(|_| {
                invalid(
                    &field,
                    format!("Invalid value: {ip:?}: must be a valid IP address"),
                )
            })?;
            if taken.ips.contains(&parsed) {
                return Err(invalid(
                    "spec.clusterIPs",
                    format!(
                        "Invalid value: []string{{{ip:?}}}: failed to allocate IP {ip}: provided IP is already allocated"
                    ),
                ));
            }
        }
        for family in families.iter().skip(ips.len()) {
            ips.push(allocator.cluster_ip(family, &taken.ips)?.to_string());
        }
    }
    // Never empty: "None", or one address per family (and there is at least one family).
    let primary = ips.first().cloned().unwrap_or_default();
    spec.insert("clusterIP".into(), json!(primary));
    spec.insert("clusterIPs".into(), json!(ips));
    spec.insert("ipFamilies".into(), json!(families));
    Ok(())
}

/// Port defaults (protocol, targetPort) and node ports; returns the node ports this Service
/// holds.
fn ports(
    spec: &mut Map<String, Value>,
    old_spec: Option<&Value>,
    service_type: &str,
    allocator: &mut Allocator,
    taken: &mut Taken,
) -> Result<Vec<u16>, Invalid> {
    let uses_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    if uses_node_ports {
        default_to(spec, "externalTrafficPolicy", json!("Cluster"));
    } else {
        spec.remove("externalTrafficPolicy");
    }
    if service_type == "LoadBalancer" {
        default_to(spec, "allocateLoadBalancerNodePorts", json!(true));
    } else {
        spec.remove("allocateLoadBalancerNodePorts");
    }
    let allocates = service_type == "NodePort"
        || (service_type == "LoadBalancer"
            && spec.get("allocateLoadBalancerNodePorts") != Some(&json!(false)));

    // An update that omits a port's nodePort keeps the one the port of that name had.
    let old_used_node_ports = old_spec
        .and_then(|s| s.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| matches!(t, "NodePort" | "LoadBalancer"));
    let old_by_name: HashMap<String, u16> = old_spec
        .filter(|_| old_used_node_ports)
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p.get("name").and_then(Value::as_str).unwrap_or("");
            let port = u16::try_from(p.get("nodePort")?.as_u64()?).ok()?;
            Some((name.to_string(), port))
        })
        .collect();

    let mut mine = Vec::new();
    let Some(Value::Array(ports)) = spec.get_mut("ports") else {
        return Ok(mine);
    };
    for (index, port) in ports.iter_mut().enumerate() {
        let port = super::object::as_object_mut(port);
        default_to(port, "protocol", json!("TCP"));
        if unset(port.get("targetPort"))
            && let Some(number) = port.get("port").cloned()
        {
            port.insert("targetPort".into(), number);
        }
        if !uses_node_ports {
            port.remove("nodePort");
            continue;
        }
        let given = port
            .get("nodePort")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        let node_port = match given {
            Some(given) if taken.node_ports.contains(&given) => {
                return Err(invalid(
                    format!("spec.ports[{index}].nodePort"),
                    format!("Invalid value: {given}: provided port is already allocated"),
                ));
            }
            Some(given) => given,
            None if !allocates => continue,
            None => {
                let name = port.get("name").and_then(Value::as_str).unwrap_or("");
                match old_by_name.get(name) {
                    Some(kept) if !mine.contains(kept) => *kept,
                    _ => {
                        let mut busy = taken.node_ports.clone();
                        busy.extend(&mine);
                        allocator.node_port(&busy)?
                    }
                }
            }
        };
        port.insert("nodePort".into(), json!(node_port));
        mine.push(node_port);
    }
    Ok(mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaulted(mut service: Value, old: Option<&Value>, others: &[Value]) -> Value {
        let mut allocator = Allocator::default();
        apply_defaults(&mut service, old, others.iter(), &mut allocator).unwrap();
        service
    }

    #[test]
    fn a_bare_service_gets_what_kubectl_shows_after_create() {
        let service = defaulted(json!({"spec": {"ports": [{"port": 80}]}}), None, &[]);
        assert_eq!(
            service,
            json!({"spec": {
                "type": "ClusterIP", "sessionAffinity": "None",
                "clusterIP": "198.19.0.1", "clusterIPs": ["198.19.0.1"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster",
                "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
            }, "status": {"loadBalancer": {}}})
        );
    }

    #[test]
    fn load_balancers_get_node_ports_and_keep_them_on_update() {
        let create = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}});
        let stored = defaulted(create.clone(), None, &[]);
        let spec = &stored["spec"];
        assert_eq!(spec["allocateLoadBalancerNodePorts"], true);
        assert_eq!(spec["ports"][0]["nodePort"], 30000);
        assert_eq!(spec["ports"][1]["nodePort"], 30001);
        assert_eq!(spec["healthCheckNodePort"], 30002);
        // A fresh allocator would hand out 198.19.0.1 and 30000 again: the update keeps them.
        let updated = defaulted(create, Some(&stored), &[]);
        assert_eq!(updated, stored);
    }

    #[test]
    fn taken_addresses_and_ports_are_refused_or_skipped() {
        let other = json!({"spec": {"clusterIPs": ["198.19.0.1"], "ports": [{"nodePort": 30000}]}});
        let service = defaulted(
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
            None,
            std::slice::from_ref(&other),
        );
        assert_eq!(service["spec"]["clusterIP"], "198.19.0.2");
        assert_eq!(service["spec"]["ports"][0]["nodePort"], 30001);
        let mut clash =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}});
        let refused = apply_defaults(
            &mut clash,
            None,
            [&other].into_iter(),
            &mut Allocator::default(),
        );
        assert_eq!(refused.unwrap_err().field, "spec.ports[0].nodePort");
    }

    #[test]
    fn dual_stack_and_headless() {
        let dual = defaulted(
            json!({"spec": {"ipFamilyPolicy": "PreferDualStack"}}),
            None,
            &[],
        );
        assert_eq!(
            dual["spec"]["clusterIPs"],
            json!(["198.19.0.1", "2001:db8:ffff::1"])
        );
        assert_eq!(dual["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        let headless = defaulted(
            json!({"spec": {"clusterIP": "None", "selector": {"app": "db"}}}),
            None,
            &[],
        );
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        assert_eq!(headless["spec"]["ipFamilyPolicy"], "SingleStack");
    }

    #[test]
    fn leaving_load_balancer_drops_node_ports() {
        let lb = defaulted(
            json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
            None,
            &[],
        );
        let mut update = lb.clone();
        update["spec"]["type"] = json!("ClusterIP");
        let cluster_ip = defaulted(update, Some(&lb), &[]);
        assert_eq!(cluster_ip["spec"]["ports"][0].get("nodePort"), None);
        assert_eq!(cluster_ip["spec"].get("externalTrafficPolicy"), None);
        assert_eq!(cluster_ip["spec"]["clusterIP"], lb["spec"]["clusterIP"]);
    }
}
