//! Callbacks: when an execution with a `callback_url` reaches its final
//! state, the execution (as `GET /api/v1/executions/{id}` shows it) is
//! POSTed there, signed, at least once.
//!
//! - Signature: `X-Signature: sha256=<hex HMAC-SHA256 over "{X-Timestamp}.{body}">`
//!   with the subject's signing secret (`GET /api/v1/signing-secret`,
//!   rotated with `POST /api/v1/signing-secret/rotate`).
//! - `X-Delivery-Id` is the same on every retry of one final state, so a
//!   receiver drops duplicates by it; `X-Attempt` counts the tries.
//! - Retried with exponential backoff on a connection failure, a timeout
//!   or a 5xx, after `Retry-After` on a 429; any other answer ends it
//!   (2xx delivered, else failed). The queue is the database, so a
//!   delivery survives restarts; a claim holds a delivery for the length
//!   of one try, then another replica may take it.
//! - Targets ([`Targets`]): http(s) only, and never loopback, private,
//!   link-local or otherwise non-public addresses unless
//!   `CALLBACK_ALLOW_NETWORKS` lists them; checked at submission and again
//!   before each try, and the connection goes to the address that was
//!   checked (no DNS rebinding in between).
//!
//! # Layout
//! - [`Targets`]: which callback URLs are allowed.
//! - [`Callbacks`]: the delivery loop ([`Callbacks::run`]) and signing
//!   secrets.
//! - [`sign`]: the signature a receiver checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::now_ms;
use super::view::ExecutionView;
use crate::store::{ExecutionQueue, QueuedExecution, StoreError};
use fnrt_core::metrics::Metrics;

/// Tries of one delivery before it is `failed`.
pub const MAX_DELIVERY_ATTEMPTS: i32 = 8;
/// How long one try may take.
const TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's wait, doubled for each next one.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Which callback URLs are allowed: public addresses, and the networks
/// the operator lists (`CALLBACK_ALLOW_NETWORKS`).
#[derive(Debug, Clone, Default)]
pub struct Targets {
    allowed: Vec<(IpAddr, u8)>,
}

impl Targets {
    /// From `a.b.c.d[/n]` and IPv6 `addr[/n]` entries.
    pub fn new(networks: &[String]) -> anyhow::Result<Targets> {
        let mut allowed = Vec::new();
        for entry in networks.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (addr, prefix) = match entry.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (entry, None),
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| anyhow::anyhow!("CALLBACK_ALLOW_NETWORKS: {entry:?} is not an address or network"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| anyhow::anyhow!("CALLBACK_ALLOW_NETWORKS: bad prefix length in {entry:?}"))?,
            };
            allowed.push((addr, prefix));
        }
        Ok(Targets { allowed })
    }

    fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        public(ip) || self.allowed.iter().any(|(net, prefix)| contains(*net, *prefix, ip))
    }

    /// Checks a URL's form (400 material): http(s), a host, no credentials.
    pub fn parse(&self, url: &str) -> Result<reqwest::Url, String> {
        if url.len() > 2048 {
            return Err("'callback_url' is longer than 2048 characters".into());
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("'callback_url' is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("'callback_url' must be http or https".into());
        }
        if parsed.host().is_none() {
            return Err("'callback_url' has no host".into());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("'callback_url' must not carry credentials".into());
        }
        Ok(parsed)
    }

    /// The address to connect to: every address the host resolves to must
    /// be allowed (a name with one private address among public ones is
    /// refused).
    pub async fn resolve(&self, url: &reqwest::Url) -> Result<SocketAddr, String> {
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| format!("resolving {host} timed out"))?
                .map_err(|e| format!("{host} does not resolve: {e}"))?
                .collect(),
        };
        let first = *addrs.first().ok_or_else(|| format!("{host} has no address"))?;
        if let Some(refused) = addrs.iter().find(|a| !self.allows(a.ip())) {
            return Err(format!(
                "'callback_url' reaches {} , which is not a public address (the controller's operator can allow \
                 networks with CALLBACK_ALLOW_NETWORKS)",
                refused.ip()
            ));
        }
        Ok(first)
    }
}

/// Whether `ip` is a public unicast address.
fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

fn contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    let (net, ip, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    let shift = width - u32::from(prefix);
    shift >= 128 || (net >> shift) == (ip >> shift)
}

/// `sha256=<hex>`: HMAC-SHA256 with `secret` over `"{timestamp}.{body}"`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers callbacks and keeps signing secrets.
pub struct Callbacks {
    queue: Arc<dyn ExecutionQueue>,
    pub targets: Targets,
    metrics: Arc<Metrics>,
    /// A final state with a callback on this replica: deliver at once.
    pub wake: Notify,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// How one try went.
enum Tried {
    Delivered,
    /// Try again after this long.
    Retry(Duration, String),
    Failed(String),
}

impl Callbacks {
    pub fn new(queue: Arc<dyn ExecutionQueue>, targets: Targets, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Callbacks {
            queue,
            targets,
            metrics,
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// The subject's signing secret, made on first use.
    pub async fn secret(&self, subject: &str) -> Result<(String, i64), StoreError> {
        self.queue.signing_secret(subject, &new_secret(), now_ms()).await
    }

    /// A new signing secret for the subject; the old one signs nothing more.
    pub async fn rotate(&self, subject: &str) -> Result<(String, i64), StoreError> {
        let now = now_ms();
        let secret = new_secret();
        self.queue.rotate_signing_secret(subject, &secret, now).await?;
        Ok((secret, now))
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Delivers due callbacks, one at a time per replica, until stopped.
    pub async fn run(self: Arc<Self>) {
        loop {
            let now = now_ms();
            let hold = now + (TRY_TIMEOUT + Duration::from_secs(5)).as_millis() as i64;
            match self.queue.claim_callback(now, hold).await {
                Ok(Some(row)) => {
                    tokio::select! {
                        () = self.deliver(row) => {}
                        // The claim's hold expires; another try follows.
                        () = self.shutdown.cancelled() => return,
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "claiming a callback"),
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn deliver(&self, row: QueuedExecution) {
        let (Some(url), Some(delivery)) = (row.callback_url.clone(), row.delivery_id.clone()) else {
            return;
        };
        let attempt = row.callback_attempts;
        let tried = self.try_once(&url, &delivery, attempt, &row).await;
        let (status, next, error, outcome) = match tried {
            Tried::Delivered => ("delivered", now_ms(), None, "delivered"),
            Tried::Failed(e) => ("failed", now_ms(), Some(e), "failed"),
            Tried::Retry(_, e) if attempt >= MAX_DELIVERY_ATTEMPTS => ("failed", now_ms(), Some(e), "failed"),
            Tried::Retry(wait, e) => ("pending", now_ms() + wait.as_millis() as i64, Some(e), "retried"),
        };
        self.metrics.record_callback(outcome);
        match self
            .queue
            .callback_done(&row.id, &delivery, status, next, error.as_deref())
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(execution = %row.id, error = %e, "recording a callback try; it will be tried again")
            }
        }
    }

    async fn try_once(&self, url: &str, delivery: &str, attempt: i32, row: &QueuedExecution) -> Tried {
        let backoff = FIRST_RETRY * 2u32.saturating_pow((attempt - 1).clamp(0, 20) as u32);
        let parsed = match self.targets.parse(url) {
            Ok(u) => u,
            Err(e) => return Tried::Failed(e),
        };
        let addr = match self.targets.resolve(&parsed).await {
            Ok(a) => a,
            // A name that does not resolve now may later; a refused address stays refused.
            Err(e) if e.contains("not a public address") => return Tried::Failed(e),
            Err(e) => return Tried::Retry(backoff, e),
        };
        let (secret, _) = match self.secret(&row.subject).await {
            Ok(s) => s,
            Err(e) => return Tried::Retry(backoff, format!("reading the signing secret: {e}")),
        };
        let body = serde_json::to_vec(&ExecutionView::from(row.clone())).unwrap_or_default();
        let timestamp = now_ms() / 1000;
        // The connection goes to the address checked above.
        let mut client = reqwest::Client::builder()
            .timeout(TRY_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fnrt-callbacks/", env!("CARGO_PKG_VERSION")));
        if let Some(host) = parsed.host_str().filter(|h| h.parse::<IpAddr>().is_err()) {
            client = client.resolve(host, addr);
        }
        let client = match client.build() {
            Ok(c) => c,
            Err(e) => return Tried::Retry(backoff, format!("building the HTTP client: {e}")),
        };
        let sent = client
            .post(parsed)
            .header("content-type", "application/json")
            .header("x-execution-id", &row.id)
            .header("x-delivery-id", delivery)
            .header("x-attempt", attempt.to_string())
            .header("x-timestamp", timestamp.to_string())
            .header("x-signature", sign(&secret, timestamp, &body))
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return Tried::Retry(backoff, format!("POST failed: {e}")),
        };
        let status = response.status();
        if status.is_success() {
            return Tried::Delivered;
        }
        if status.as_u16() == 429 {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(backoff, |s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
            return Tried::Retry(wait, "the receiver answered 429".into());
        }
        if status.is_server_error() {
            return Tried::Retry(backoff, format!("the receiver answered {status}"));
        }
        Tried::Failed(format!("the receiver answered {status}"))
    }
}

/// 32 random bytes, hex.
fn new_secret() -> String {
    format!("whsec_{}", hex::encode(rand::random::<[u8; 32]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_unless_listed() {
        let none = Targets::default();
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!none.allows(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "2606:4700::1", "203.0.113.80"] {
            assert!(none.allows(public.parse().unwrap()), "{public}");
        }
        let some = Targets::new(&["127.0.0.1".into(), "10.0.0.0/8".into()]).unwrap();
        assert!(some.allows("127.0.0.1".parse().unwrap()));
        assert!(some.allows("10.200.0.1".parse().unwrap()));
        assert!(!some.allows("127.0.0.2".parse().unwrap()));
        assert!(Targets::new(&["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn urls_are_http_with_a_host_and_no_credentials() {
        let t = Targets::default();
        assert!(t.parse("https://hooks.example.com/x?y=1").is_ok());
        for bad in [
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "not a url",
            "file:///etc/passwd",
        ] {
            assert!(t.parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Python: hmac.new(b"key", b"1.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            sign("key", 1, b"{}"),
            "sha256=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
    }
}
