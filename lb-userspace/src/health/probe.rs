//! One probe: a TCP connect, an HTTP/1.1 GET or a UDP exchange against a
//! target, all within the probe's timeout. A minimal HTTP client: the probe
//! needs a status line and, at most, a substring of the body.
//!
//! A via-VIP probe's socket carries its target's mark (`SO_MARK`, set
//! before it connects, so that the route and every packet have it): that
//! is what the node's tc egress program encapsulates. Setting a mark takes
//! CAP_NET_ADMIN; without it the probe fails with `error: permission
//! denied`.

use std::{io, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    time::timeout,
};

use super::{ProbeKind, ProbeTarget, Reason};

/// Most of an HTTP reply a probe reads.
const MAX_REPLY: usize = 64 * 1024;

/// Runs `target`'s probe once.
pub async fn probe(target: &ProbeTarget) -> Result<(), Reason> {
    let addr = target.socket();
    let mark = target.mark();
    let work = async {
        match &target.spec.kind {
            ProbeKind::Tcp => connect(addr, mark).await.map(drop),
            ProbeKind::Http {
                path,
                host,
                statuses,
                body,
            } => {
                let host = host.clone().unwrap_or_else(|| host_header(addr));
                http(addr, mark, path, &host, statuses, body.as_deref()).await
            }
            ProbeKind::Udp { payload, expect } => udp(addr, mark, payload, expect.as_deref()).await,
        }
    };
    match timeout(target.spec.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(Reason::Timeout),
    }
}

fn host_header(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
    }
}

fn reason(err: &io::Error) -> Reason {
    use io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused => Reason::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => Reason::Reset,
        TimedOut => Reason::Timeout,
        HostUnreachable | NetworkUnreachable => Reason::Unreachable,
        kind => Reason::Error(kind.to_string()),
    }
}

/// Marks a probe socket for the tc egress program.
fn set_mark(socket: &impl std::os::fd::AsFd, mark: Option<u32>) -> Result<(), Reason> {
    match mark {
        Some(mark) => socket2::SockRef::from(socket)
            .set_mark(mark)
            .map_err(|e| reason(&e)),
        None => Ok(()),
    }
}

/// A connection that closes with a reset: a probe every second to 10 000
/// backends would otherwise leave 10 000 sockets a second in TIME_WAIT.
async fn connect(addr: SocketAddr, mark: Option<u32>) -> Result<TcpStream, Reason> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| reason(&e))?;
    socket.set_zero_linger().map_err(|e| reason(&e))?;
    set_mark(&socket, mark)?;
    socket.connect(addr).await.map_err(|e| reason(&e))
}

async fn http(
    addr: SocketAddr,
    mark: Option<u32>,
    path: &str,
    host: &str,
    statuses: &[u16],
    body: Option<&str>,
) -> Result<(), Reason> {
    let mut stream = connect(addr, mark).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| reason(&e))?;
    let mut reply = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| reason(&e))?;
        let ended = n == 0;
        reply.extend_from_slice(&buf[..n]);
        if let Some(verdict) = judge(&reply, statuses, body, ended || reply.len() >= MAX_REPLY) {
            return verdict;
        }
    }
}

/// The verdict on an HTTP reply read so far, `None` while more is needed;
/// `complete` says nothing more will come.
fn judge(
    reply: &[u8],
    statuses: &[u16],
    body: Option<&str>,
    complete: bool,
) -> Option<Result<(), Reason>> {
    let Some(head_end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return complete.then(|| {
            Err(if reply.is_empty() {
                Reason::NoReply
            } else {
                status_of(reply).map_or(Reason::Malformed, |_| Reason::NoReply)
            })
        });
    };
    let code = match status_of(&reply[..head_end]) {
        Some(code) => code,
        None => return Some(Err(Reason::Malformed)),
    };
    if !statuses.contains(&code) {
        return Some(Err(Reason::BadStatus(code)));
    }
    let Some(want) = body else {
        return Some(Ok(()));
    };
    let got = &reply[head_end + 4..];
    let found = got.windows(want.len().max(1)).any(|w| w == want.as_bytes());
    if found {
        Some(Ok(()))
    } else if complete || content_length(&reply[..head_end]).is_some_and(|len| got.len() >= len) {
        Some(Err(Reason::BodyMismatch))
    } else {
        None
    }
}

/// The status code of `HTTP/1.x NNN ...`.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut words = line.split(' ');
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

async fn udp(
    addr: SocketAddr,
    mark: Option<u32>,
    payload: &[u8],
    expect: Option<&[u8]>,
) -> Result<(), Reason> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| reason(&e))?;
    set_mark(&socket, mark)?;
    // Connected: an ICMP port unreachable comes back as "refused".
    socket.connect(addr).await.map_err(|e| reason(&e))?;
    socket.send(payload).await.map_err(|e| reason(&e))?;
    let mut buf = vec![0u8; 2048];
    let n = socket.recv(&mut buf).await.map_err(|e| reason(&e))?;
    match expect {
        Some(want) if !buf[..n].windows(want.len().max(1)).any(|w| w == want) => {
            Err(Reason::BodyMismatch)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(reply: &str, body: Option<&str>, complete: bool) -> Option<Result<(), Reason>> {
        judge(reply.as_bytes(), &[200, 204], body, complete)
    }

    #[test]
    fn http_replies_are_judged_by_status_then_body() {
        assert_eq!(
            verdict("HTTP/1.1 200 OK\r\n\r\n", None, false),
            Some(Ok(()))
        );
        assert_eq!(
            verdict("HTTP/1.0 204 No\r\n\r\n", None, false),
            Some(Ok(()))
        );
        assert_eq!(
            verdict("HTTP/1.1 503 Busy\r\n\r\n", None, false),
            Some(Err(Reason::BadStatus(503)))
        );
        assert_eq!(verdict("HTTP/1.1 200 OK\r\n", None, false), None);
        assert_eq!(verdict("", None, true), Some(Err(Reason::NoReply)));
        assert_eq!(
            verdict("SSH-2.0\r\n\r\n", None, false),
            Some(Err(Reason::Malformed))
        );
        assert_eq!(verdict("garbage", None, true), Some(Err(Reason::Malformed)));
    }

    #[test]
    fn the_expected_body_is_searched_until_the_reply_ends() {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n";
        assert_eq!(
            verdict(&format!("{head}all ok\n"), Some("ok"), false),
            Some(Ok(()))
        );
        assert_eq!(verdict(&format!("{head}al"), Some("ok"), false), None);
        assert_eq!(
            verdict(&format!("{head}failed!"), Some("ok"), false),
            Some(Err(Reason::BodyMismatch))
        );
        let no_length = "HTTP/1.1 200 OK\r\n\r\nfailed";
        assert_eq!(verdict(no_length, Some("ok"), false), None);
        assert_eq!(
            verdict(no_length, Some("ok"), true),
            Some(Err(Reason::BodyMismatch))
        );
    }
}
