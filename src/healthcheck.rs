//! `jobqueue healthcheck`: asks the instance on this machine for `/healthz`, for a container's
//! HEALTHCHECK. The binary does it itself so that the image needs no curl (and no shell).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::Config;

/// The address to reach the local instance at: its BIND address, or loopback when it binds to all.
pub fn local_addr(config: &Config) -> SocketAddr {
    let ip = match config.bind {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, config.port)
}

/// Ok when `/healthz` answers 200 within `timeout`; the error says what it got instead.
pub async fn run(config: &Config, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("http://{}/healthz", local_addr(config));
    let client = reqwest::Client::builder().timeout(timeout).no_proxy().build()?;
    let resp = client.get(&url).send().await.map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("{url}: {status} {}", body.trim())
    }
}
