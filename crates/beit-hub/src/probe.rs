//! A quick reachability check of the hub endpoint before `hf-hub` is used.
//!
//! `hf-hub` 0.5 builds its HTTP agent without a connect timeout, so an endpoint whose packets are
//! silently dropped would stall for the operating system's TCP timeout (about two minutes on
//! Linux). Opening one TCP connection with a bounded timeout first turns that into a prompt, clear
//! error. The check is skipped when a proxy is configured, because then the endpoint itself need
//! not be reachable directly.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Host and port of an `http(s)://host[:port][/...]` URL (IPv6 literals in brackets allowed).
pub(crate) fn host_port(endpoint: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("`{endpoint}` is not a URL (expected http:// or https://)"))?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        other => return Err(format!("unsupported URL scheme `{other}` in `{endpoint}`")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("bad IPv6 host in `{endpoint}`"))?;
        (host.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in `{endpoint}`"));
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("bad port `{p}` in `{endpoint}`"))?,
        None => default_port,
    };
    Ok((host, port))
}

/// Whether a proxy is configured (ureq, inside `hf-hub`, honours these variables).
fn proxy_configured() -> bool {
    ["ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY"].iter().any(|v| {
        [v.to_string(), v.to_ascii_lowercase()]
            .iter()
            .any(|k| std::env::var(k).is_ok_and(|x| !x.trim().is_empty()))
    })
}

/// Open (and close) one TCP connection to the endpoint within `timeout`; the error says why not.
pub(crate) fn probe(endpoint: &str, timeout: Duration) -> Result<(), String> {
    if proxy_configured() {
        return Ok(());
    }
    let (host, port) = host_port(endpoint)?;
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                last = format!(
                    "no answer from {addr} within {:.0} s (HF_HUB_ETAG_TIMEOUT)",
                    timeout.as_secs_f64()
                )
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let hp = |e: &str| host_port(e);
        assert_eq!(
            hp("https://huggingface.co").unwrap(),
            ("huggingface.co".into(), 443)
        );
        assert_eq!(
            hp("http://127.0.0.1:8080/").unwrap(),
            ("127.0.0.1".into(), 8080)
        );
        assert_eq!(
            hp("https://u:p@mirror.example/hf").unwrap(),
            ("mirror.example".into(), 443)
        );
        assert_eq!(hp("http://[::1]:9000").unwrap(), ("::1".into(), 9000));
        assert!(hp("huggingface.co").unwrap_err().contains("not a URL"));
        assert!(hp("ftp://x")
            .unwrap_err()
            .contains("unsupported URL scheme"));
        assert!(hp("http://h:port").unwrap_err().contains("bad port"));
    }
}
