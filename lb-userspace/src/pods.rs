//! Finding local pods' interfaces from the routes to the endpoints, with no CNI-specific
//! configuration: an endpoint is a local pod when the kernel's route to its address leaves by
//! a veth (or netkit) interface whose peer lives in another network namespace. That interface
//! is the pod's host-side end, where [`crate::Dataplane::attach_pod_interface`] takes it onto
//! the fast path.
//!
//! The questions go to the kernel over rtnetlink (`RTM_GETROUTE` for one address, as `ip route
//! get` asks, so policy rules count; `RTM_GETLINK` for the interface), in the calling thread's
//! network namespace.

use std::{collections::BTreeMap, net::IpAddr};

use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};

use crate::rtnetlink::{Exchange, NetlinkError, RouteSocket, host_route};

/// Errors of asking the kernel about routes and interfaces.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The rtnetlink socket failed, or an answer did not parse.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// A local pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name.
    pub name: String,
    /// Its index.
    pub ifindex: u32,
}

/// An rtnetlink socket asking which endpoints are local pods.
pub struct Discovery {
    socket: RouteSocket,
}

impl Discovery {
    /// Opens the socket, in the calling thread's network namespace.
    pub fn new() -> Result<Self, DiscoveryError> {
        Ok(Self {
            socket: RouteSocket::open(false)?,
        })
    }

    /// The local pods among `addrs`, each with its host-side interface.
    ///
    /// Cheap when there is nothing to find, as on a host without pods: one dump of the
    /// interfaces. Otherwise one dump of the routes narrows the addresses down to those a
    /// direct route to a pod interface covers, and the kernel's own answer for each of those
    /// (`ip route get`, policy rules included) decides.
    pub fn local_pods(
        &mut self,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<BTreeMap<IpAddr, PodInterface>, DiscoveryError> {
        let mut found = BTreeMap::new();
        let interfaces = self.pod_interfaces()?;
        if interfaces.is_empty() {
            return Ok(found);
        }
        let routes = self.direct_routes(&interfaces)?;
        for addr in addrs {
            if found.contains_key(&addr) || !routes.iter().any(|route| route.covers(addr)) {
                continue;
            }
            if let Some(oif) = self.route_interface(addr)?
                && let Some(interface) = interfaces.get(&oif)
            {
                found.insert(addr, interface.clone());
            }
        }
        Ok(found)
    }

    /// Interfaces that are one end of a veth (or netkit) pair whose other end lives in
    /// another network namespace, by index.
    fn pod_interfaces(&mut self) -> Result<BTreeMap<u32, PodInterface>, DiscoveryError> {
        let mut interfaces = BTreeMap::new();
        for message in self.ask(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)? {
            let RouteNetlinkMessage::NewLink(link) = message else {
                continue;
            };
            let mut name = None;
            let mut pair = false;
            let mut peer_elsewhere = false;
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
                    LinkAttribute::LinkInfo(infos) => {
                        pair = infos.iter().any(|info| {
                            matches!(info, LinkInfo::Kind(InfoKind::Veth | InfoKind::Netkit))
                        });
                    }
                    _ => {}
                }
            }
            if let Some(name) = name.filter(|_| pair && peer_elsewhere) {
                let ifindex = link.header.index;
                interfaces.insert(ifindex, PodInterface { name, ifindex });
            }
        }
        Ok(interfaces)
    }

    /// The direct (gateway-less) unicast routes through `interfaces`, of every table.
    fn direct_routes(
        &mut self,
        interfaces: &BTreeMap<u32, PodInterface>,
    ) -> Result<Vec<Prefix>, DiscoveryError> {
        let mut routes = Vec::new();
        for message in self.ask(RouteNetlinkMessage::GetRoute(RouteMessage::default()), true)? {
            let RouteNetlinkMessage::NewRoute(route) = message else {
                continue;
            };
            let Some(oif) = direct_unicast_interface(&route) else {
                continue;
            };
            if !interfaces.contains_key(&oif) {
                continue;
            }
            let destination = route
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
            let length = route.header.destination_prefix_length;
            let destination = match (destination, route.header.address_family) {
                (Some(addr), _) => addr,
                // A default route through a pod interface covers everything of its family.
                (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                _ => continue,
            };
            routes.push(Prefix {
                addr: destination,
                length,
            });
        }
        Ok(routes)
    }

    /// The interface the kernel's route to `addr` leaves by, for a direct unicast route.
    fn route_interface(&mut self, addr: IpAddr) -> Result<Option<u32>, DiscoveryError> {
        let message = host_route(addr);
        // An error answer (no route) leaves nothing.
        Ok(self
            .ask(RouteNetlinkMessage::GetRoute(message), false)?
            .iter()
            .find_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route) => direct_unicast_interface(route),
                _ => None,
            }))
    }

    /// Sends one request and collects its answers: one, or a dump's; none when the kernel
    /// answers with an error (no route to the address, say).
    fn ask(
        &mut self,
        request: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, DiscoveryError> {
        let exchange = if dump { Exchange::Dump } else { Exchange::Get };
        match self.socket.ask(request, exchange) {
            Err(NetlinkError::Refused(_)) => Ok(Vec::new()),
            other => Ok(other?),
        }
    }
}

/// The interface of a unicast route with no gateway: how a host reaches its own pods.
fn direct_unicast_interface(route: &RouteMessage) -> Option<u32> {
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_) => {
                return None;
            }
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    oif
}

/// A route's destination prefix.
#[derive(Clone, Copy, Debug)]
struct Prefix {
    addr: IpAddr,
    length: u8,
}

impl Prefix {
    /// Whether `addr` lies in the prefix.
    fn covers(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32u32.saturating_sub(self.length.into()))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128u32.saturating_sub(self.length.into()))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_covers_its_addresses_only() {
        let prefix = |addr: &str, length| Prefix {
            addr: addr.parse().unwrap(),
            length,
        };
        let addr = |a: &str| a.parse::<IpAddr>().unwrap();
        assert!(prefix("198.18.1.0", 24).covers(addr("198.18.1.7")));
        assert!(!prefix("198.18.1.0", 24).covers(addr("198.18.2.7")));
        assert!(prefix("198.18.1.7", 32).covers(addr("198.18.1.7")));
        assert!(prefix("0.0.0.0", 0).covers(addr("203.0.113.1")));
        assert!(!prefix("0.0.0.0", 0).covers(addr("2001:db8::1")));
        assert!(prefix("2001:db8:1::", 64).covers(addr("2001:db8:1::1")));
        assert!(!prefix("2001:db8:1::", 64).covers(addr("2001:db8:2::1")));
    }
}
