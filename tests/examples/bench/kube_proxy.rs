//! kube-proxy's rule patterns, the kernel baselines of the forwarding and HTTP benchmarks:
//! iptables (`-m statistic --mode random` chains, through iptables-nft) and nftables
//! (`numgen random mod N vmap`), a VIP:8080 spread over pods 198.18.N.1:8080.

use std::net::Ipv4Addr;

use lb_tests::netns::Netns;

/// `iptables-restore` input for `proto` ("tcp" or "udp") to `vip` over `pods` pods.
pub fn iptables_rules(vip: Ipv4Addr, proto: &str, pods: u8) -> String {
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-TOMCAT - [0:0]\n");
    for i in 1..=pods {
        rules += &format!(":KUBE-SEP-{i} - [0:0]\n");
    }
    rules += "-A PREROUTING -j KUBE-SERVICES\n";
    rules += &format!(
        "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m {proto} --dport 8080 -j KUBE-SVC-TOMCAT\n"
    );
    for i in 1..=pods {
        if i < pods {
            rules += &format!(
                "-A KUBE-SVC-TOMCAT -m statistic --mode random --probability {:.5} -j KUBE-SEP-{i}\n",
                1.0 / f64::from(pods - i + 1)
            );
        } else {
            rules += &format!("-A KUBE-SVC-TOMCAT -j KUBE-SEP-{i}\n");
        }
        rules += &format!(
            "-A KUBE-SEP-{i} -p {proto} -m {proto} -j DNAT --to-destination 198.18.{i}.1:8080\n"
        );
    }
    rules + "COMMIT\n"
}

/// `nft -f -` input for `proto` to `vip` over `pods` pods.
pub fn nft_rules(vip: Ipv4Addr, proto: &str, pods: u8) -> String {
    let vmap: Vec<String> = (1..=pods)
        .map(|i| format!("{} : jump sep{i}", i - 1))
        .collect();
    let mut rules = format!(
        "table ip kube {{\n  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; ip daddr {vip} {proto} dport 8080 jump svc; }}\n  chain svc {{ numgen random mod {pods} vmap {{ {} }}; }}\n",
        vmap.join(", ")
    );
    for i in 1..=pods {
        rules += &format!("  chain sep{i} {{ meta l4proto {proto} dnat to 198.18.{i}.1:8080; }}\n");
    }
    rules + "}\n"
}

/// Loads rules into `ns` by feeding them to `program` (`iptables-restore`, or `nft -f -`).
pub fn load(ns: &Netns, program: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let args: &[&str] = if program == "nft" { &["-f", "-"] } else { &[] };
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(
        child.wait()?.success(),
        "{program} refused the rules:\n{rules}"
    );
    Ok(())
}

/// Removes both rule sets and the connections they tracked.
pub fn reset(ns: &Netns) {
    let _ = ns.exec("iptables", &["-t", "nat", "-F"]);
    let _ = ns.exec("iptables", &["-t", "nat", "-X"]);
    let _ = ns.exec("nft", &["delete", "table", "ip", "kube"]);
    let _ = ns.exec("conntrack", &["-F"]);
}
