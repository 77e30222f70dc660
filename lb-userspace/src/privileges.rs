//! Least privilege: the capabilities the controller needs, checked at start with a message
//! that names what is missing, rather than a bare EPERM from the kernel later.

/// A capability, by number and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Its bit in the capability sets.
    pub bit: u32,
    /// `CAP_...`.
    pub name: &'static str,
    /// What it is needed for.
    pub why: &'static str,
}

/// `CAP_NET_ADMIN`.
pub const NET_ADMIN: Capability = Capability {
    bit: 12,
    name: "CAP_NET_ADMIN",
    why: "attach XDP and TC programs",
};
/// `CAP_SYS_ADMIN`, which stands in for `CAP_BPF` and `CAP_PERFMON` on its own.
pub const SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    why: "mount the bpffs",
};
/// `CAP_PERFMON`.
pub const PERFMON: Capability = Capability {
    bit: 38,
    name: "CAP_PERFMON",
    why: "load programs that read packet memory",
};
/// `CAP_BPF`.
pub const BPF: Capability = Capability {
    bit: 39,
    name: "CAP_BPF",
    why: "create maps and load programs",
};

/// The effective capability set of this process.
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The capabilities `attach` needs that `effective` lacks (`CAP_SYS_ADMIN` covers `CAP_BPF`
/// and `CAP_PERFMON`).
pub fn missing_for_attach(effective: u64) -> Vec<Capability> {
    let has = |c: Capability| effective & (1 << c.bit) != 0;
    let mut missing = Vec::new();
    if !has(NET_ADMIN) {
        missing.push(NET_ADMIN);
    }
    if !has(SYS_ADMIN) {
        for c in [BPF, PERFMON] {
            if !has(c) {
                missing.push(c);
            }
        }
    }
    missing
}

/// Fails with a message naming every missing capability and what it is for.
pub fn require_for_attach() -> anyhow::Result<()> {
    let missing = missing_for_attach(effective());
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|c| format!("{} (to {})", c.name, c.why))
        .collect();
    anyhow::bail!(
        "missing capabilities: {}. Run as root, or grant them, e.g. \
         `setcap cap_net_admin,cap_bpf,cap_perfmon,cap_sys_admin+ep lb-userspace`",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_covers_bpf_and_perfmon() {
        let all = (1 << NET_ADMIN.bit) | (1 << SYS_ADMIN.bit);
        assert!(missing_for_attach(all).is_empty());
        let fine_grained = (1 << NET_ADMIN.bit) | (1 << BPF.bit) | (1 << PERFMON.bit);
        assert!(missing_for_attach(fine_grained).is_empty());
        assert_eq!(missing_for_attach(0), vec![NET_ADMIN, BPF, PERFMON]);
    }
}
