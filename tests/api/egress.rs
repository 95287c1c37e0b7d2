//! `network.egress`: a function reaches what its manifest lists and
//! nothing else, attacked through the API. Without the field an instance
//! has only its own loopback (walls.rs); with it, slirp4netns gives its
//! namespace the internet and an nftables ruleset in that namespace
//! narrows it (fnrt_backends::egress).
//!
//! The destinations are the package registries these machines reach
//! (pypi.org, registry.npmjs.org), the only internet they have; the
//! host's services are the controller, Redis and PostgreSQL on 127.0.0.1.

use std::net::ToSocketAddrs;

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

/// Connects to each `host:port` and says how it went.
const PROBE: &str = r#"import errno
import socket
import subprocess


def attempt(target):
    host, port = target.rsplit(":", 1)
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return "unresolved"
    try:
        socket.create_connection((addr, int(port)), timeout=5).close()
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def handler(params, context):
    out = {}
    if params.get("unwall"):
        # Tries to drop the rules of its own namespace.
        for cmd in (["/usr/sbin/nft", "flush", "ruleset"], ["/usr/sbin/nft", "list", "ruleset"]):
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                out[" ".join(cmd[1:])] = run.returncode
            except OSError as e:
                out[" ".join(cmd[1:])] = str(e)
    for target in params["targets"]:
        out[target] = attempt(target)
    return out
"#;

async fn probe(app: &TestApp, lt: &str, params: Value) -> Value {
    let token = app.admin();
    let id = app.session(&token, lt, json!({})).await;
    let r = app
        .execute_with(&token, &id, json!({ "params": params }), Some("no-cache"))
        .await;
    assert_eq!(r.status, 200, "{lt}: {:?}", r.body);
    r.body["result"].clone()
}

fn port_of(app: &TestApp) -> u16 {
    app.url("")
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_reaches_what_its_manifest_lists_and_nothing_else() {
    reaches_only_what_it_lists(&spawn_app().await).await;
}

/// The same probe with a narrow list, with `*`, and with none, on whatever
/// backend `app` places Python on (containers.rs: the docker backend).
pub(crate) async fn reaches_only_what_it_lists(app: &TestApp) {
    // Arrange
    let listed = "python-egress-listed";
    let anywhere = "python-egress-anywhere";
    let nowhere = "python-egress-none";
    app.register(listed, PROBE, json!({"network": {"egress": ["PyPI.org:443"]}}))
        .await;
    app.register(anywhere, PROBE, json!({"network": {"egress": ["*"]}}))
        .await;
    app.register(nowhere, PROBE, json!({})).await;
    let pypi = ("pypi.org", 443)
        .to_socket_addrs()
        .unwrap()
        .find(|a| a.is_ipv4())
        .unwrap()
        .ip();
    let controller = format!("127.0.0.1:{}", port_of(app));
    let host_services = [controller.as_str(), "127.0.0.1:6379", "127.0.0.1:5432"];
    // slirp's gateway is the host; 169.254.169.254 is a cloud's metadata.
    let gateway = format!("10.0.2.2:{}", port_of(app));
    let other_port = format!("{pypi}:80");
    let mut targets = vec![
        "pypi.org:443",
        "registry.npmjs.org:443",
        &other_port,
        &gateway,
        "169.254.169.254:80",
    ];
    targets.extend(host_services);

    // Act
    let narrow = probe(app, listed, json!({"targets": targets, "unwall": true})).await;
    let open = probe(app, anywhere, json!({"targets": targets})).await;
    let closed = probe(app, nowhere, json!({"targets": [format!("{pypi}:443")]})).await;

    // Assert: the listed destination only; the function could not drop its
    // rules; another port of the same address, open to `*`, stays closed.
    assert_eq!(narrow["pypi.org:443"], "connected", "{narrow}");
    assert_eq!(narrow["registry.npmjs.org:443"], "unresolved", "{narrow}");
    assert_eq!(narrow[&other_port], "ECONNREFUSED", "{narrow}");
    assert_ne!(narrow["flush ruleset"], 0, "{narrow}");
    assert_eq!(open["pypi.org:443"], "connected", "{open}");
    assert_eq!(open["registry.npmjs.org:443"], "connected", "{open}");
    assert_eq!(open[&other_port], "connected", "{open}");
    // Never the host, its services or link-local addresses, even for `*`.
    for result in [&narrow, &open] {
        for target in host_services.iter().chain([&gateway.as_str(), &"169.254.169.254:80"]) {
            let got = result[*target].as_str().unwrap();
            assert!(
                matches!(got, "ECONNREFUSED" | "EHOSTUNREACH" | "ENETUNREACH" | "EACCES"),
                "{target}: {got} ({result})"
            );
        }
    }
    // Without the field: no network at all.
    let got = closed[format!("{pypi}:443")].as_str().unwrap();
    assert!(matches!(got, "ENETUNREACH" | "EHOSTUNREACH"), "{closed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_entries_are_checked_at_registration_and_shown_in_the_detail() {
    // Arrange
    let app = spawn_app().await;
    let refused = [
        ("python-eg-loop", "127.0.0.1:6379", "never reachable"),
        ("python-eg-local", "localhost", "never reachable"),
        ("python-eg-meta", "169.254.169.254", "metadata"),
        ("python-eg-wild", "*.example.com", "wildcard"),
        ("python-eg-six", "[2001:db8::1]:443", "IPv6"),
        ("python-eg-port", "example.com:99999", "port"),
        ("wasm-eg", "example.com", "wasm functions have no network"),
    ];

    // Act + Assert: each refused with a message naming the field.
    for (lt, entry, says) in refused {
        let code = if lt.starts_with("wasm") {
            "(module (func (export \"handler\")))"
        } else {
            "def handler(params, context):\n    return {}\n"
        };
        let r = app
            .post_function(json!({
                "language_title": lt, "description": "d", "code": code,
                "network": {"egress": [entry]},
            }))
            .await;
        assert_eq!(r.status, 400, "{entry}: {:?}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("network.egress") && message.contains(says),
            "{entry}: {message}"
        );
    }
    let r = app
        .register(
            "python-eg-ok",
            "def handler(params, context):\n    return {}\n",
            json!({"network": {"egress": ["API.Example.com:443", "198.51.100.77/24", "*:443"]}}),
        )
        .await;
    assert_eq!(
        r.body["network"]["egress"],
        json!(["api.example.com:443", "198.51.100.0/24", "*:443"])
    );
    let plain = app
        .register(
            "python-eg-plain",
            "def handler(params, context):\n    return {}\n",
            json!({}),
        )
        .await;
    assert!(plain.body.get("network").is_none(), "{:?}", plain.body);
}

/// slirp4netns runs as the controller's user and parses the function's
/// packets: it holds no descriptor of the controller's but the two pipes
/// it is given (`--ready-fd`, `--exit-fd`) and its own (`/dev/net/tun`).
#[tokio::test(flavor = "multi_thread")]
async fn the_user_mode_network_holds_no_descriptor_of_the_controllers() {
    let app = spawn_app().await;
    let lt = "python-egress-fds";
    app.register(lt, PROBE, json!({"network": {"egress": ["pypi.org:443"]}}))
        .await;
    let token = app.admin();
    let id = app.session(&token, lt, json!({"retain_session": true})).await;
    let r = app.execute(&token, &id, json!({"targets": []})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // This test's process is the controller: its slirp4netns are its children.
    let slirps: Vec<u32> = crate::helpers::children_of(std::process::id())
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "slirp4netns"))
        .collect();
    assert!(!slirps.is_empty(), "no slirp4netns beside a function with egress");
    for pid in slirps {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let given: Vec<String> = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .filter_map(|a| a.strip_prefix("--ready-fd=").or_else(|| a.strip_prefix("--exit-fd=")))
            .map(str::to_owned)
            .collect();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue; // it ended meanwhile (another test's)
        };
        let fds: Vec<(String, String)> = dir
            .flatten()
            .filter_map(|e| {
                let target = std::fs::read_link(e.path()).ok()?.display().to_string();
                Some((e.file_name().to_string_lossy().into_owned(), target))
            })
            .filter(|(fd, target)| !given.contains(fd) && target != "/dev/net/tun")
            .collect();
        let inherited = crate::helpers::descriptors_not_its_own(fds.iter().map(|(fd, t)| (fd.as_str(), t.as_str())));
        assert!(inherited.is_empty(), "slirp4netns {pid}: {inherited:?} of {fds:?}");
    }
}
