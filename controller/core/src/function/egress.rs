//! `network.egress` in a manifest: where a function's instances may
//! connect. Without it an instance has only its own loopback.
//!
//! An entry is a destination and an optional port:
//! - `api.example.com`, `api.example.com:443`: a host name, resolved (IPv4)
//!   by the controller when an instance starts; inside, the name resolves
//!   through the instance's `/etc/hosts` to exactly those addresses;
//! - `203.0.113.7`, `198.51.100.0/24:5432`: an IPv4 address or network;
//! - `*`, `*:443`: any public IPv4 address (private, shared and
//!   link-local ranges stay closed unless listed on their own), and DNS.
//!
//! Never reachable, whatever is listed: the host itself (loopback, its own
//! addresses), link-local addresses (cloud metadata) and the instance's
//! virtual network. Wildcard names and IPv6 are refused with a message
//! that says so.
//!
//! # Layout
//! - [`Egress`]: one checked entry ([`Egress::parse`], its text form via
//!   `Display`, which is what is stored).
//! - [`Target`]: what it names.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most entries in `network.egress`.
pub const MAX_EGRESS: usize = 32;

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Egress {
    pub target: Target,
    /// `None`: every port.
    pub port: Option<u16>,
}

/// What an [`Egress`] entry names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Any public IPv4 address, and DNS.
    Any,
    /// A host name (lower case), resolved when an instance starts.
    Name(String),
    /// An IPv4 network (a single address is a /32), its host bits cleared.
    Net(Ipv4Addr, u8),
}

impl Egress {
    /// Checks one entry; the message says what is wrong with it.
    pub fn parse(text: &str) -> Result<Egress, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("an empty entry".into());
        }
        if text.starts_with('[') || text.matches(':').count() > 1 {
            return Err(format!(
                "{text:?}: IPv6 destinations are not supported (instances have IPv4 egress only)"
            ));
        }
        let (host, port) = match text.split_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{text:?}: the port must be a number from 1 to 65535"))?;
                (host, Some(port))
            }
            None => (text, None),
        };
        let target = if host == "*" {
            Target::Any
        } else if let Some((addr, prefix)) = host.split_once('/') {
            let addr = Ipv4Addr::from_str(addr).map_err(|_| format!("{text:?}: not an IPv4 network (a.b.c.d/n)"))?;
            let prefix = prefix
                .parse::<u8>()
                .ok()
                .filter(|p| (1..=32).contains(p))
                .ok_or_else(|| format!("{text:?}: the prefix length must be from 1 to 32 (\"*\" means anywhere)"))?;
            Target::Net(network(addr, prefix), prefix)
        } else if let Ok(addr) = Ipv4Addr::from_str(host) {
            Target::Net(addr, 32)
        } else if host.starts_with("*.") {
            return Err(format!(
                "{text:?}: wildcard names are not supported; list each name (names are resolved when an \
                 instance starts)"
            ));
        } else if valid_name(host) {
            Target::Name(host.to_ascii_lowercase())
        } else {
            return Err(format!(
                "{text:?}: not a host name, an IPv4 address or network, or \"*\""
            ));
        };
        match &target {
            Target::Name(name) if name == "localhost" || name.ends_with(".localhost") => Err(format!(
                "{text:?}: the controller's host is never reachable from a function"
            )),
            Target::Net(addr, prefix) if overlaps(*addr, *prefix, Ipv4Addr::new(127, 0, 0, 0), 8) => Err(format!(
                "{text:?}: the controller's host (loopback) is never reachable from a function"
            )),
            Target::Net(addr, prefix)
                if overlaps(*addr, *prefix, Ipv4Addr::new(169, 254, 0, 0), 16)
                    || overlaps(*addr, *prefix, Ipv4Addr::new(0, 0, 0, 0), 8) =>
            {
                Err(format!(
                    "{text:?}: link-local and unspecified addresses (cloud metadata among them) are never reachable"
                ))
            }
            _ => Ok(Egress { target, port }),
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Any => f.write_str("*")?,
            Target::Name(name) => f.write_str(name)?,
            Target::Net(addr, 32) => write!(f, "{addr}")?,
            Target::Net(addr, prefix) => write!(f, "{addr}/{prefix}")?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl TryFrom<String> for Egress {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Egress::parse(&text)
    }
}

impl From<Egress> for String {
    fn from(e: Egress) -> String {
        e.to_string()
    }
}

/// `addr` with the bits past `prefix` cleared.
pub fn network(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ipv4Addr::from(u32::from(addr) & mask)
}

/// Whether two networks share an address.
pub fn overlaps(a: Ipv4Addr, a_prefix: u8, b: Ipv4Addr, b_prefix: u8) -> bool {
    let prefix = a_prefix.min(b_prefix);
    network(a, prefix) == network(b, prefix)
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens.
fn valid_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // Not all digits: "1.2.3" is a mistyped address, not a name.
        && name.bytes().any(|b| b.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_addresses_networks_and_any() {
        for (text, shown) in [
            ("API.example.com", "api.example.com"),
            ("api.example.com:443", "api.example.com:443"),
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.7:80", "203.0.113.7:80"),
            ("198.51.100.77/24:5432", "198.51.100.0/24:5432"),
            ("10.1.2.3", "10.1.2.3"),
            ("*", "*"),
            ("*:443", "*:443"),
        ] {
            assert_eq!(Egress::parse(text).unwrap().to_string(), shown, "{text}");
        }
    }

    #[test]
    fn refuses_the_host_metadata_wildcards_and_ipv6() {
        for text in [
            "",
            "localhost",
            "x.localhost:80",
            "127.0.0.1",
            "127.1.2.3:6379",
            "0.0.0.0/0",
            "96.0.0.0/3",
            "169.254.169.254",
            "0.0.0.0",
            "*.example.com",
            "[::1]:80",
            "2001:db8::1",
            "example.com:0",
            "example.com:70000",
            "example.com:http",
            "1.2.3",
            "exa mple.com",
            "-bad.example.com",
            "10.0.0.0/33",
        ] {
            assert!(Egress::parse(text).is_err(), "accepted {text:?}");
        }
    }

    #[test]
    fn round_trips_through_serde() {
        let e: Egress = serde_json::from_str("\"198.51.100.9/30:22\"").unwrap();
        assert_eq!(e.target, Target::Net(Ipv4Addr::new(198, 51, 100, 8), 30));
        assert_eq!(serde_json::to_string(&e).unwrap(), "\"198.51.100.8/30:22\"");
        assert!(serde_json::from_str::<Egress>("\"127.0.0.1\"").is_err());
    }
}
