//! The local control API: how `xlb vip|cluster|backend|status|attach|detach`
//! talk to a running `xlb run`.
//!
//! # Transport
//!
//! A Unix stream socket (`node.api_socket`, `/run/xlb/xlb.sock` by default),
//! mode 0600 and owned by root: only root may connect, and the server also
//! refuses peers whose uid is neither 0 nor its own. Each request is one
//! line of JSON ([`Request`]), each answer one line of JSON ([`Response`]);
//! a connection may carry any number of them, one at a time.
//!
//! ```text
//! → {"request":"backend_drain","vip":"web","cluster":"east","name":"e1"}
//! ← {"response":"changed","message":"backend web/east/e1 drained","reconcile":{...}}
//! → {"request":"vip_add","name":"web","addr":"198.18.100.1","port":80,"ring_size":65536}
//! ← {"response":"error","message":"vip.\"web\".ring_size: 65536 is not prime; ..."}
//! ```
//!
//! # Semantics
//!
//! The server does not touch the data plane: it hands each request to the
//! daemon's reconcile loop (see [`crate::daemon`]) and waits for its answer.
//! A change is applied to a copy of the desired state, validated as a config
//! file would be, reconciled into the maps and saved to `node.state_file`
//! before the answer is sent; an invalid change is refused with the field
//! and the reason, and changes nothing.

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    dataplane::AttachMode,
    state::{AdminState, Affinity, Health, Proto},
};

/// Longest request or response line accepted, in bytes.
pub const MAX_LINE: usize = 4 << 20;
/// How long the client waits for an answer: a reconcile of many large rings
/// takes a while, a hung daemon should not hang the CLI forever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Wire types. The desired-state model has no serde (it is not a wire
// format); these small enums are, and convert both ways.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl From<Protocol> for Proto {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
        }
    }
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Proto::from(*self).fmt(f)
    }
}

/// What a VIP's flows hash on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlowAffinity {
    /// The 5-tuple.
    #[default]
    Flow,
    /// The client address alone.
    Client,
}

impl From<FlowAffinity> for Affinity {
    fn from(a: FlowAffinity) -> Self {
        match a {
            FlowAffinity::Flow => Affinity::Flow,
            FlowAffinity::Client => Affinity::Client,
        }
    }
}

impl From<Affinity> for FlowAffinity {
    fn from(a: Affinity) -> Self {
        match a {
            Affinity::Flow => FlowAffinity::Flow,
            Affinity::Client => FlowAffinity::Client,
        }
    }
}

impl fmt::Display for FlowAffinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowAffinity::Flow => "flow",
            FlowAffinity::Client => "client",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    Enabled,
    Drained,
    Disabled,
}

impl From<AdminState> for Admin {
    fn from(a: AdminState) -> Self {
        match a {
            AdminState::Enabled => Admin::Enabled,
            AdminState::Drained => Admin::Drained,
            AdminState::Disabled => Admin::Disabled,
        }
    }
}

impl fmt::Display for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Admin::Enabled => "enabled",
            Admin::Drained => "drained",
            Admin::Disabled => "disabled",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Up,
    Down,
}

impl From<Health> for HealthState {
    fn from(h: Health) -> Self {
        match h {
            Health::Up => HealthState::Up,
            Health::Down => HealthState::Down,
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthState::Up => "up",
            HealthState::Down => "down",
        })
    }
}

/// How to attach the balancer, as asked and as got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    /// Native where the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// In the driver: the fast path.
    Native,
    /// In the generic network stack: any device, slower.
    Generic,
}

impl From<AttachKind> for AttachMode {
    fn from(k: AttachKind) -> Self {
        match k {
            AttachKind::Auto => AttachMode::Auto,
            AttachKind::Native => AttachMode::Native,
            AttachKind::Generic => AttachMode::Generic,
        }
    }
}

impl From<AttachMode> for AttachKind {
    fn from(m: AttachMode) -> Self {
        match m {
            AttachMode::Auto => AttachKind::Auto,
            AttachMode::Native => AttachKind::Native,
            AttachMode::Generic => AttachKind::Generic,
        }
    }
}

impl fmt::Display for AttachKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachKind::Auto => "auto",
            AttachKind::Native => "native",
            AttachKind::Generic => "generic",
        })
    }
}

/// `198.18.100.1:80`, `[fd00::1]:53`: an address and port as a socket
/// address is written.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

// ---------------------------------------------------------------------------
// Requests and responses.

/// One request. Names are those of the config file: a VIP by its name, a
/// cluster by VIP and name, a backend by VIP, cluster and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A new VIP, without clusters yet.
    VipAdd {
        name: String,
        addr: IpAddr,
        /// 0: every port of `proto`.
        port: u16,
        #[serde(default)]
        proto: Protocol,
        /// A prime; 65537 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ring_size: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        affinity: Option<FlowAffinity>,
    },
    VipDel {
        name: String,
    },
    VipList,
    ClusterAdd {
        vip: String,
        name: String,
        /// 1 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
        /// 0 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<u32>,
    },
    ClusterDel {
        vip: String,
        name: String,
    },
    ClusterWeight {
        vip: String,
        name: String,
        weight: u32,
    },
    ClusterPriority {
        vip: String,
        name: String,
        priority: u32,
    },
    /// Every VIP's clusters, or one VIP's.
    ClusterList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
    },
    BackendAdd {
        vip: String,
        cluster: String,
        name: String,
        addr: IpAddr,
        /// 1 when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
    },
    BackendDel {
        vip: String,
        cluster: String,
        name: String,
    },
    /// No new flows; established flows stay until they end.
    BackendDrain {
        vip: String,
        cluster: String,
        name: String,
    },
    /// Back in service (from drained or disabled).
    BackendUndrain {
        vip: String,
        cluster: String,
        name: String,
    },
    BackendWeight {
        vip: String,
        cluster: String,
        name: String,
        weight: u32,
    },
    /// Every VIP's backends, or one VIP's.
    BackendList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
    },
    Status,
    /// Every counter of every VIP, cluster and backend, and the global ones:
    /// what `/metrics`, `xlb stats` and `xlb top` show.
    Stats,
    /// Puts the balancer on an interface of the daemon's namespace.
    Attach {
        interface: String,
        #[serde(default)]
        mode: AttachKind,
    },
    /// Takes the balancer off one interface; without one, off every
    /// interface, deleting the pins, and the daemon stops.
    Detach {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        interface: Option<String>,
    },
}

impl Request {
    /// Whether the request changes the desired state (and so is validated,
    /// reconciled and saved).
    pub fn changes_state(&self) -> bool {
        !matches!(
            self,
            Request::VipList
                | Request::ClusterList { .. }
                | Request::BackendList { .. }
                | Request::Status
                | Request::Stats
                | Request::Attach { .. }
                | Request::Detach { .. }
        )
    }
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// A change was made: what it was, and what the reconcile wrote.
    Changed {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconcile: Option<ReconcileReport>,
    },
    Vips {
        vips: Vec<VipView>,
    },
    Clusters {
        clusters: Vec<ClusterView>,
    },
    Backends {
        backends: Vec<BackendView>,
    },
    Status {
        status: Box<Status>,
    },
    Stats {
        stats: Box<crate::metrics::Stats>,
    },
    /// The request was refused (or failed); nothing was changed unless the
    /// message says otherwise.
    Error {
        message: String,
    },
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
        }
    }
}

/// What one reconcile wrote, and how long it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub vips_written: usize,
    pub vips_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    pub ring_slots_written: usize,
    pub micros: u64,
}

impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} VIP(s) written, {} removed; {} backend(s) written, {} removed; \
             {} ring slot(s) written; {:.1} ms",
            self.vips_written,
            self.vips_removed,
            self.backends_written,
            self.backends_removed,
            self.ring_slots_written,
            self.micros as f64 / 1000.0
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub ring_size: u32,
    pub affinity: FlowAffinity,
    /// Its id in the data plane; `None` before it is programmed.
    pub id: Option<u32>,
    /// `normal`, `spilled from priority P to Q`, `panic` or `empty`.
    pub mode: String,
    /// The share of its enabled backends that is healthy, as the panic
    /// threshold sees it.
    pub healthy: f64,
    /// What the node's locality preference did.
    pub locality: String,
    /// Ring slots that point at a backend (0 when no backend takes flows).
    pub slots: u32,
    pub clusters: Vec<ClusterView>,
    pub backends: Vec<BackendView>,
    /// Packets and bytes the balancer sent on for it.
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub vip: String,
    pub name: String,
    pub weight: u32,
    pub priority: u32,
    pub backends: usize,
    /// Fraction of the VIP's new flows it takes, by policy.
    pub share: f64,
    /// Usable weight over the weight of all its backends.
    pub capacity: f64,
    /// Usable weight over enabled weight; `None` when nothing is enabled.
    pub healthy: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: String,
    pub cluster: String,
    pub name: String,
    pub addr: IpAddr,
    pub weight: u32,
    pub admin: Admin,
    pub health: HealthState,
    /// Fraction of the VIP's new flows, by policy.
    pub share: f64,
    /// Ring slots it owns: its share as the data plane applies it.
    pub slots: u32,
    /// Its id in the data plane (per VIP and address).
    pub id: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
    /// Its probe's state, when it is probed.
    #[serde(default)]
    pub probe: Option<crate::health::TargetStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub interface: String,
    pub mode: AttachKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub config: PathBuf,
    pub state_file: PathBuf,
    pub pin_path: PathBuf,
    pub attachments: Vec<AttachmentView>,
    pub vips: Vec<VipView>,
    pub last_reconcile: Option<ReconcileReport>,
    /// The balancer's global counters that are not zero, by name.
    pub counters: BTreeMap<String, u64>,
    /// Probe counters and transition latency, when anything is probed.
    #[serde(default)]
    pub health: Option<crate::health::HealthSnapshot>,
    /// The fleet's store, when the node runs on one (`--store etcd://...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::etcd::StoreStatus>,
}

// ---------------------------------------------------------------------------
// Client.

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no xlb daemon at {}: start it with `xlb run --config ...`", .socket.display())]
    NotRunning { socket: PathBuf },
    #[error("cannot connect to {}: permission denied (the control API is for root only)", .socket.display())]
    PermissionDenied { socket: PathBuf },
    #[error("talking to the xlb daemon at {}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the xlb daemon at {} closed the connection without answering", .socket.display())]
    Closed { socket: PathBuf },
    #[error("unexpected answer from the xlb daemon: {0}")]
    Protocol(String),
    /// The daemon refused or failed the request; its words.
    #[error("{0}")]
    Refused(String),
}

/// A connection to the daemon's control API.
pub struct Client {
    socket: PathBuf,
    reader: BufReader<StdUnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Self, ApiError> {
        let stream = StdUnixStream::connect(socket).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ApiError::NotRunning {
                socket: socket.to_owned(),
            },
            io::ErrorKind::PermissionDenied => ApiError::PermissionDenied {
                socket: socket.to_owned(),
            },
            _ => ApiError::Io {
                socket: socket.to_owned(),
                source: err,
            },
        })?;
        let io = |source| ApiError::Io {
            socket: socket.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
        Ok(Self {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and waits for its answer. A refusal from the
    /// daemon is `Err(ApiError::Refused)`.
    pub fn call(&mut self, request: &Request) -> Result<Response, ApiError> {
        let io = |source| ApiError::Io {
            socket: self.socket.clone(),
            source,
        };
        let mut line = serde_json::to_string(request)
            .map_err(|err| ApiError::Protocol(format!("encoding the request: {err}")))?;
        line.push('\n');
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(io)?;
        let mut answer = String::new();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut answer)
            .map_err(io)?;
        if read == 0 {
            return Err(ApiError::Closed {
                socket: self.socket.clone(),
            });
        }
        if !answer.ends_with('\n') {
            return Err(ApiError::Protocol(format!(
                "an answer longer than {MAX_LINE} bytes, or cut short"
            )));
        }
        match serde_json::from_str(&answer) {
            Ok(Response::Error { message }) => Err(ApiError::Refused(message)),
            Ok(response) => Ok(response),
            Err(err) => Err(ApiError::Protocol(format!("{err}: {}", answer.trim_end()))),
        }
    }
}

// ---------------------------------------------------------------------------
// Server.

/// A request on its way to the reconcile loop, with where its answer goes.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// The bound control socket; removes its file when dropped (if the file is
/// still this socket, not a successor's).
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another xlb daemon is serving {}: stop it first", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket: remove it or choose another node.api_socket", .0.display())]
    NotASocket(PathBuf),
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Listener {
    /// Binds the control socket at `path`: creates its directory, replaces a
    /// stale socket a dead daemon left, refuses when a live daemon answers
    /// there, and makes the socket root only (0600).
    pub fn bind(path: &Path) -> Result<Self, BindError> {
        let err = |what, source| BindError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            fs::create_dir_all(dir).map_err(|source| BindError::Io {
                what: "creating the directory of",
                path: dir.to_owned(),
                source,
            })?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if StdUnixStream::connect(path).is_ok() {
                    return Err(BindError::InUse(path.to_owned()));
                }
                log::info!("removing the stale control socket {}", path.display());
                fs::remove_file(path).map_err(|source| err("removing the stale socket", source))?;
            }
            Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(err("looking at", source)),
        }
        let listener = UnixListener::bind(path).map_err(|source| err("binding", source))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|source| err("making root-only", source))?;
        let inode = fs::metadata(path)
            .map_err(|source| err("looking at", source))?
            .ino();
        Ok(Self {
            listener,
            path: path.to_owned(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections and forwards their requests to `calls` until
    /// `stop` turns true (or its sender is gone); then stops accepting, and
    /// the connections in flight end after their current request.
    pub async fn serve(self, calls: mpsc::Sender<Call>, mut stop: watch::Receiver<bool>) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(connection(stream, calls.clone(), stop.clone()));
                    }
                    Err(err) => {
                        log::warn!("control API: accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(calls);
        // Let each connection finish the request it is in; they see `stop`.
        while connections.join_next().await.is_some() {}
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Whether a peer may use the API: root, or the daemon's own user.
fn allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|err| format!("cannot tell who is connecting: {err}"))?;
    // SAFETY: geteuid cannot fail.
    let own = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == own {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not use the xlb control API (root only)",
            cred.uid()
        ))
    }
}

async fn connection(
    stream: UnixStream,
    calls: mpsc::Sender<Call>,
    mut stop: watch::Receiver<bool>,
) {
    let refused = allowed(&stream);
    let (read, mut write) = stream.into_split();
    let mut lines = AsyncBufReader::new(read);
    if let Err(message) = refused {
        log::warn!("control API: {message}");
        let _ = send(&mut write, &Response::error(message)).await;
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            read = limited.read_until(b'\n', &mut line) => read,
            _ = stop.changed() => return,
        };
        match read {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) => {
                log::debug!("control API: reading a request: {err}");
                return;
            }
        }
        if line.last() != Some(&b'\n') {
            let _ = send(
                &mut write,
                &Response::error(format!("request longer than {MAX_LINE} bytes")),
            )
            .await;
            return;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Err(err) => Response::error(format!("invalid request: {err}")),
            Ok(request) => {
                log::debug!("control API: {request:?}");
                let (reply, answer) = oneshot::channel();
                if calls.send(Call { request, reply }).await.is_err() {
                    Response::error("the xlb daemon is shutting down")
                } else {
                    answer
                        .await
                        .unwrap_or_else(|_| Response::error("the xlb daemon is shutting down"))
                }
            }
        };
        if send(&mut write, &response).await.is_err() {
            return;
        }
        if *stop.borrow() {
            return;
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let requests = [
            Request::VipAdd {
                name: "web".into(),
                addr: "198.18.100.1".parse().unwrap(),
                port: 80,
                proto: Protocol::Udp,
                ring_size: Some(1009),
                affinity: Some(FlowAffinity::Client),
            },
            Request::BackendDrain {
                vip: "web".into(),
                cluster: "east".into(),
                name: "e1".into(),
            },
            Request::Detach { interface: None },
            Request::Status,
        ];
        for request in requests {
            let line = serde_json::to_string(&request).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        }
        let minimal: Request =
            serde_json::from_str(r#"{"request":"vip_add","name":"w","addr":"fd00::1","port":0}"#)
                .unwrap();
        assert_eq!(
            minimal,
            Request::VipAdd {
                name: "w".into(),
                addr: "fd00::1".parse().unwrap(),
                port: 0,
                proto: Protocol::Tcp,
                ring_size: None,
                affinity: None,
            }
        );
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        for (line, fragment) in [
            (
                r#"{"request":"vip_add","name":"w","addr":"1.2.3","port":0}"#,
                "invalid IP address",
            ),
            (r#"{"request":"vip_del"}"#, "missing field `name`"),
            (r#"{"request":"nope"}"#, "unknown variant `nope`"),
            (
                r#"{"request":"vip_del","name":"w","nmae":1}"#,
                "unknown field `nmae`",
            ),
        ] {
            let err = serde_json::from_str::<Request>(line).unwrap_err();
            assert!(err.to_string().contains(fragment), "{line}: {err}");
        }
    }

    #[test]
    fn a_refusal_is_an_error_response() {
        let line = serde_json::to_string(&Response::error("no VIP named \"x\"")).unwrap();
        assert_eq!(
            line,
            r#"{"response":"error","message":"no VIP named \"x\""}"#
        );
    }

    #[test]
    fn no_daemon_is_said_plainly() {
        let err = Client::connect(Path::new("/nonexistent/xlb.sock"))
            .err()
            .expect("nothing listens there");
        assert_eq!(
            err.to_string(),
            "no xlb daemon at /nonexistent/xlb.sock: start it with `xlb run --config ...`"
        );
    }

    #[tokio::test]
    async fn the_server_forwards_requests_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("xlb-api-test-{}", std::process::id()));
        let path = dir.join("sub/xlb.sock");
        // A stale socket file from a dead daemon is replaced.
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = Listener::bind(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(Listener::bind(&path), Err(BindError::InUse(_))));

        let (calls_tx, mut calls) = mpsc::channel::<Call>(4);
        let (stop_tx, stop) = watch::channel(false);
        let server = tokio::spawn(listener.serve(calls_tx, stop));
        let handler = tokio::spawn(async move {
            while let Some(call) = calls.recv().await {
                let response = match call.request {
                    Request::Status => Response::Changed {
                        message: "fine".into(),
                        reconcile: None,
                    },
                    _ => Response::error("refused"),
                };
                let _ = call.reply.send(response);
            }
        });
        let client_path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = Client::connect(&client_path).unwrap();
            assert!(matches!(
                client.call(&Request::Status),
                Ok(Response::Changed { .. })
            ));
            assert!(matches!(
                client.call(&Request::VipList),
                Err(ApiError::Refused(m)) if m == "refused"
            ));
        })
        .await
        .unwrap();
        stop_tx.send(true).unwrap();
        server.await.unwrap();
        handler.await.unwrap();
        assert!(!path.exists(), "the socket is removed on shutdown");
        fs::remove_dir_all(&dir).unwrap();
    }
}
