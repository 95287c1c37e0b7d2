//! A function's `network.egress`, enforced in its instance's own network
//! namespace: slirp4netns gives the namespace the internet
//! ([`crate::netns`]), and an nftables ruleset loaded into that namespace
//! before the function runs lets out only what the manifest lists. The
//! function cannot change the rules: its uid has no capabilities.
//!
//! - Names are resolved by the controller when the instance starts (IPv4);
//!   the instance's `/etc/hosts` carries exactly those addresses, and DNS
//!   (slirp's forwarder) is reachable only with `*`, so a function without
//!   it cannot tunnel data out through DNS queries either.
//! - Never reachable, whatever the manifest lists: loopback, the host's own
//!   addresses (read from `/proc/net/fib_trie`), link-local addresses
//!   (cloud metadata), slirp's virtual network (its gateway is the host),
//!   broadcast, and IPv6 (the namespace has none).
//! - `*` is any public address: private, shared (CGNAT), benchmarking,
//!   multicast and reserved ranges stay closed unless listed on their own.
//! - What is refused is refused at once (a TCP reset, else ICMP
//!   administratively prohibited), never a hanging connect.
//!
//! # Layout
//! - [`Plan`]: what one instance gets ([`Plan::resolve`]): its rules, hosts
//!   file and resolver file.
//! - [`ruleset`]: the nftables ruleset for resolved destinations.
//! - [`load`]: loads a ruleset into a process's network namespace.
//! - [`host_addresses`], [`find_nft`].

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fnrt_core::function::egress::{Egress, Target};
use fnrt_core::function::manifest::Network;

/// slirp's DNS forwarder and virtual network, inside the namespace.
pub const SLIRP_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const SLIRP_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 2, 0), 24);

/// Never reachable from a function.
const NEVER: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(255, 255, 255, 255), 32),
];

/// Not public: closed to `*`, open only when listed on their own.
const NOT_PUBLIC: [(Ipv4Addr, u8); 6] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 3),
];

/// How long resolving the names of one instance's allow-list may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One instance's egress: what is loaded into its namespace and what it
/// sees as `/etc/hosts` and `/etc/resolv.conf`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ruleset: String,
    pub hosts: String,
    pub resolv: String,
}

/// One allowed destination, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl Plan {
    /// Resolves the names of `network` and draws the rules. A name that
    /// does not resolve is left out (logged): the function's own lookup of
    /// it then fails, as it would anywhere.
    pub async fn resolve(network: &Network) -> Plan {
        let mut allowed = Vec::new();
        let mut any = Vec::new();
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for Egress { target, port } in &network.egress {
            match target {
                Target::Any => any.push(*port),
                Target::Net(net, prefix) => allowed.push(Allowed {
                    net: *net,
                    prefix: *prefix,
                    port: *port,
                }),
                Target::Name(name) => {
                    let found =
                        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0))).await;
                    let addrs: Vec<Ipv4Addr> = match found {
                        Ok(Ok(addrs)) => addrs
                            .filter_map(|a| match a.ip() {
                                IpAddr::V4(v4) => Some(v4),
                                IpAddr::V6(_) => None,
                            })
                            .collect(),
                        Ok(Err(e)) => {
                            tracing::warn!(name, error = %e, "an egress name does not resolve; it is left out");
                            Vec::new()
                        }
                        Err(_) => {
                            tracing::warn!(name, "resolving an egress name timed out; it is left out");
                            Vec::new()
                        }
                    };
                    let mut seen = Vec::new();
                    for addr in addrs {
                        if seen.contains(&addr) {
                            continue;
                        }
                        seen.push(addr);
                        let _ = writeln!(hosts, "{addr} {name}");
                        allowed.push(Allowed {
                            net: addr,
                            prefix: 32,
                            port: *port,
                        });
                    }
                }
            }
        }
        Plan {
            ruleset: ruleset(&allowed, &any, &host_addresses()),
            hosts,
            // Without `*` the forwarder is closed: lookups fail at once.
            resolv: format!("nameserver {SLIRP_DNS}\noptions timeout:1 attempts:1\n"),
        }
    }
}

/// The nftables ruleset: `allowed` destinations, `any` (`*`, per port;
/// `None` every port), and never `host` (the host's own addresses).
/// One rule per network rather than sets, which refuse overlapping
/// intervals.
pub fn ruleset(allowed: &[Allowed], any: &[Option<u16>], host: &[Ipv4Addr]) -> String {
    let mut r = String::from(
        "table inet fnrt_egress {\n\
         \tchain deny {\n\
         \t\tmeta l4proto tcp reject with tcp reset\n\
         \t\treject with icmpx type admin-prohibited\n\
         \t}\n\
         \tchain output {\n\
         \t\ttype filter hook output priority 0; policy drop;\n\
         \t\toifname \"lo\" accept\n\
         \t\tmeta nfproto != ipv4 goto deny\n",
    );
    if !any.is_empty() {
        let _ = writeln!(
            r,
            "\t\tip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
    }
    let never = NEVER
        .iter()
        .copied()
        .chain([SLIRP_NET])
        .chain(host.iter().map(|a| (*a, 32)));
    for (net, prefix) in never {
        let _ = writeln!(r, "\t\tip daddr {net}/{prefix} goto deny");
    }
    for a in allowed {
        let _ = writeln!(r, "\t\tip daddr {}/{}{} accept", a.net, a.prefix, port_match(a.port));
    }
    if !any.is_empty() {
        for (net, prefix) in NOT_PUBLIC {
            let _ = writeln!(r, "\t\tip daddr {net}/{prefix} goto deny");
        }
        for port in any {
            let _ = writeln!(r, "\t\tmeta nfproto ipv4{} accept", port_match(*port));
        }
    }
    r.push_str("\t\tgoto deny\n\t}\n}\n");
    r
}

fn port_match(port: Option<u16>) -> String {
    match port {
        Some(p) => format!(" meta l4proto {{ tcp, udp }} th dport {p}"),
        None => String::new(),
    }
}

/// The host's own IPv4 addresses (every `LOCAL` route of its namespace):
/// through slirp's NAT they would be the host, so they are closed.
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last: Option<Ipv4Addr> = None;
    let mut found = Vec::new();
    for line in trie.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ").or_else(|| line.strip_prefix("+-- ")) {
            last = addr.split('/').next().and_then(|a| a.parse().ok());
        } else if line.contains("host LOCAL")
            && let Some(addr) = last
            && !addr.is_loopback()
            && !found.contains(&addr)
        {
            found.push(addr);
        }
    }
    found
}

/// nft's path, if nftables is installed.
pub fn find_nft() -> Option<PathBuf> {
    crate::find_tool("nft")
}

/// Loads `ruleset` into the network namespace of `pid` (as root: nsenter
/// joins the namespace, nft reads the rules from stdin).
pub async fn load(nft: &Path, pid: u32, ruleset: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/usr/bin/nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .arg(nft)
        .args(["-f", "-"])
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .map_err(|_| std::io::Error::other("nft did not finish within 5 s"))??;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(net: [u8; 4], prefix: u8, port: Option<u16>) -> Allowed {
        Allowed {
            net: Ipv4Addr::from(net),
            prefix,
            port,
        }
    }

    #[test]
    fn closes_the_host_before_anything_listed() {
        let r = ruleset(
            &[allowed([192, 0, 2, 0], 24, Some(443))],
            &[],
            &[Ipv4Addr::new(192, 0, 2, 2)],
        );
        let host = r.find("ip daddr 192.0.2.2/32 goto deny").unwrap();
        let listed = r
            .find("ip daddr 192.0.2.0/24 meta l4proto { tcp, udp } th dport 443 accept")
            .unwrap();
        assert!(host < listed, "{r}");
        assert!(r.find("ip daddr 127.0.0.0/8 goto deny").unwrap() < listed);
        assert!(r.find("ip daddr 10.0.2.0/24 goto deny").unwrap() < listed);
        // No DNS and nothing public without `*`.
        assert!(!r.contains("dport 53"), "{r}");
        assert!(!r.contains("meta nfproto ipv4 accept"), "{r}");
        assert!(r.trim_end().ends_with("goto deny\n\t}\n}"), "{r}");
    }

    #[test]
    fn any_opens_dns_and_public_addresses_only() {
        let r = ruleset(&[allowed([10, 1, 2, 3], 32, None)], &[Some(443)], &[]);
        let dns = r
            .find("ip daddr 10.0.2.3 meta l4proto { tcp, udp } th dport 53 accept")
            .unwrap();
        let slirp = r.find("ip daddr 10.0.2.0/24 goto deny").unwrap();
        let listed = r.find("ip daddr 10.1.2.3/32 accept").unwrap();
        let private = r.find("ip daddr 10.0.0.0/8 goto deny").unwrap();
        let public = r
            .find("meta nfproto ipv4 meta l4proto { tcp, udp } th dport 443 accept")
            .unwrap();
        assert!(
            dns < slirp && slirp < listed && listed < private && private < public,
            "{r}"
        );
    }

    #[test]
    fn finds_local_addresses_but_not_loopback() {
        // This namespace's loopback is always there; other addresses vary.
        assert!(host_addresses().iter().all(|a| !a.is_loopback()));
    }
}
