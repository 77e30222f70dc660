//! The host's own addresses: a VIP that is one of them is served, but only its services'
//! packets are the load balancer's (see `lb_common::maps::VIP_ADDR_F_HOST`).

use std::net::IpAddr;

/// The addresses of this host's interfaces now (they can change while the controller runs);
/// empty if they cannot be read.
pub fn addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The MTU of interface `iface`, as the kernel reports it.
pub fn mtu(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
