//! Where an encapsulated packet to each backend leaves this host: the egress
//! interface, its MAC and MTU, and the MAC of the next hop, as the `NEXTHOPS`
//! map wants them.
//!
//! The XDP program could ask the kernel's FIB per packet, but
//! `bpf_fib_lookup` costs about as much as the rest of the balancer and
//! answers NO_NEIGH until something else resolves the neighbour. So userspace
//! resolves each backend once, makes the kernel resolve missing neighbours,
//! and re-resolves when links, routes, rules or neighbours change.
//!
//! Everything goes through rtnetlink in the network namespace the resolver
//! was created in: routes are looked up the way `ip route get` does, so
//! policy routing, multipath and several NICs give the answer the kernel's
//! own output path would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use lb_common::{NEXTHOP_F_VALID, NextHop};
use log::{debug, warn};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::proto::Connection;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Coalesces the burst of notifications one change makes (a route swap is a
/// delete and an add; a link going down drops all its routes and neighbours)
/// into one pass.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// The kernel probes an unresolved neighbour a few times after a trigger
/// (3 probes, 1 s apart, by default) and then gives up; triggering again while
/// it still probes does nothing, so retries start after that and slow down
/// for neighbours that never answer, to keep ARP/ND broadcasts rare.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Some changes send no notification (path MTU exceptions) and a notification
/// can be lost when the socket overflows (then the kernel at least says so);
/// a periodic full pass bounds how long a stale answer survives either.
const RESYNC: Duration = Duration::from_secs(30);
/// Without a working notification socket, polling is all that is left.
const RESYNC_WITHOUT_EVENTS: Duration = Duration::from_secs(1);
/// Lookups in flight at once in a pass: enough to hide the round trips of
/// thousands of targets, few enough not to fill the socket's receive buffer.
const CONCURRENT_LOOKUPS: usize = 64;
/// Room for notification bursts (a NIC going down with many routes) before
/// the kernel drops some and reports an overrun, which costs a full pass.
/// The kernel caps it at `net.core.rmem_max`.
const EVENT_BUFFER_BYTES: usize = 4 << 20;

/// `NUD_VALID` in the kernel: the states whose entry holds a usable
/// link-layer address.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    /// The sockets are registered with the tokio reactor of the caller.
    #[error("the next-hop resolver must be created inside a tokio runtime")]
    NoRuntime,
    #[error("cannot open a netlink socket: {0}")]
    Socket(io::Error),
    /// No route, or an unreachable, prohibit or blackhole one (with a source
    /// set by [`NextHopResolver::with_source`], also a source address that is
    /// not local).
    #[error("no route to {0}")]
    Unreachable(IpAddr),
    /// A local, broadcast, multicast or other non-unicast route: there is no
    /// host to send an encapsulated packet to.
    #[error("{backend} is not behind a unicast route (route type {kind:?})")]
    NotUnicast { backend: IpAddr, kind: RouteType },
    /// The egress device has no Ethernet header to write (tun, wireguard,
    /// tunnel devices...).
    #[error("{backend} leaves through interface {ifindex}, which is not an Ethernet device")]
    NotEthernet { backend: IpAddr, ifindex: u32 },
    #[error("{backend} leaves through interface {ifindex}, which is down or has no carrier")]
    LinkDown { backend: IpAddr, ifindex: u32 },
    #[error("netlink request failed: {0}")]
    Netlink(rtnetlink::Error),
    #[error("unexpected netlink answer: {0}")]
    BadReply(&'static str),
}

/// The outcome of one lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Complete, with `flags == NEXTHOP_F_VALID`.
    Resolved(NextHop),
    /// The route is known but the next hop's MAC is not (yet): the kernel was
    /// asked to resolve `neighbour` on `ifindex`, so a later lookup may
    /// succeed.
    Pending { ifindex: u32, neighbour: IpAddr },
}

/// Resolves backends to next hops in the network namespace it was created in.
pub struct NextHopResolver {
    rtnl: Rtnl,
    events: EventSocket,
}

impl NextHopResolver {
    /// Opens the netlink sockets in the calling thread's current network
    /// namespace; they stay bound to it whichever thread runs the resolver
    /// later.
    pub async fn new() -> Result<Self, NextHopError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NextHopError::NoRuntime)?;
        let (connection, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(NextHopError::Socket)?;
        let connection = AbortOnDrop(runtime.spawn(connection));
        // Opened now, not in `track`, because only now is this thread in the
        // right namespace; it joins no group until `track` reads it, so that
        // nothing queues up for a resolver that is never tracked.
        let (events, _, messages) =
            rtnetlink::new_multicast_connection(&[]).map_err(NextHopError::Socket)?;
        Ok(Self {
            rtnl: Rtnl {
                handle,
                source_v4: None,
                source_v6: None,
                _connection: connection,
            },
            events: EventSocket {
                connection: events,
                messages: messages.boxed(),
            },
        })
    }

    /// Looks routes up as if sent from `source`, as the encapsulated packets
    /// are: policy rules that match on the source (`ip rule add from ...`)
    /// then apply. One source per address family; `source` must be local.
    pub fn with_source(mut self, source: IpAddr) -> Self {
        match source {
            IpAddr::V4(v4) => self.rtnl.source_v4 = Some(v4),
            IpAddr::V6(v6) => self.rtnl.source_v6 = Some(v6),
        }
        self
    }

    /// Where a packet to `backend` leaves now. When the next hop's MAC is
    /// unknown, asks the kernel to resolve it and answers `Pending`.
    pub async fn resolve(&self, backend: IpAddr) -> Result<Resolution, NextHopError> {
        let lookup = self.rtnl.lookup(backend).await?;
        if let Resolution::Pending { ifindex, neighbour } = lookup.resolution {
            self.rtnl
                .trigger(Neighbour {
                    ifindex,
                    addr: neighbour,
                })
                .await?;
        }
        Ok(lookup.resolution)
    }

    /// Keeps the next hops of `targets` (backend id to address) current,
    /// sending `(id, Some(next_hop))` or `(id, None)` on `updates` whenever a
    /// target's answer changes. `None` means no usable next hop now (no route,
    /// neighbour not resolved, link down, or the id left the set); an id is
    /// assumed to start at `None`, so a target that never resolves sends
    /// nothing.
    ///
    /// Resolves every target when the set changes, and again a few
    /// milliseconds after link, route, rule or neighbour notifications that
    /// may affect one; retries unresolved neighbours with a back-off; asks the
    /// kernel to re-confirm stale neighbours, since traffic sent by XDP does
    /// not. Returns when the sender of `targets` or the receiver of `updates`
    /// is dropped.
    pub async fn track(
        self,
        mut targets: watch::Receiver<BTreeMap<u32, IpAddr>>,
        updates: mpsc::Sender<(u32, Option<NextHop>)>,
    ) {
        let Self { rtnl, events } = self;
        let (mut events, _events_connection) = match events.join() {
            Ok((messages, connection)) => (Some(messages), Some(connection)),
            Err(err) => {
                warn!(
                    "next hops: cannot subscribe to netlink notifications ({err}); \
                     polling every {RESYNC_WITHOUT_EVENTS:?} instead"
                );
                (None, None)
            }
        };
        let mut tracker = Tracker::new(&rtnl);
        // The next pass: when, and over which targets. The first resolves
        // the initial set at once.
        let mut pass_at = Some(Instant::now());
        let mut scope = Scope::All;
        let mut resync_at = Instant::now() + RESYNC;
        loop {
            let wake_at = [pass_at, tracker.retry_at]
                .into_iter()
                .flatten()
                .fold(resync_at, Instant::min);
            tokio::select! {
                changed = targets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    scope = Scope::All;
                    pass_at = Some(Instant::now());
                }
                event = next_event(&mut events) => match event {
                    Some(message) => {
                        match tracker.concerns(&message) {
                            Concern::Nothing => continue,
                            Concern::Everything => scope = Scope::All,
                            Concern::Neighbour(neighbour) => scope.add(neighbour),
                        }
                        pass_at.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                    }
                    None => {
                        warn!(
                            "next hops: the netlink notification socket closed; \
                             polling every {RESYNC_WITHOUT_EVENTS:?} instead"
                        );
                        events = None;
                    }
                },
                () = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    if resync_at <= now {
                        scope = Scope::All;
                    }
                    for neighbour in tracker.due(now).collect::<Vec<_>>() {
                        scope.add(neighbour);
                    }
                    let full = matches!(scope, Scope::All);
                    // Only a full pass marks the set as seen: a change that
                    // comes in meanwhile must still wake `changed` above.
                    let set = if full {
                        targets.borrow_and_update().clone()
                    } else {
                        targets.borrow().clone()
                    };
                    if tracker.pass(&set, &scope, &updates).await.is_err() {
                        return;
                    }
                    if full {
                        let period = if events.is_some() { RESYNC } else { RESYNC_WITHOUT_EVENTS };
                        resync_at = Instant::now() + period;
                    }
                    pass_at = None;
                    scope = Scope::none();
                }
                () = updates.closed() => return,
            }
        }
    }
}

type Event = (NetlinkMessage<RouteNetlinkMessage>, SocketAddr);

/// The notification socket, unsubscribed until [`EventSocket::join`].
struct EventSocket {
    connection: Connection<RouteNetlinkMessage>,
    messages: BoxStream<'static, Event>,
}

impl EventSocket {
    fn join(mut self) -> io::Result<(BoxStream<'static, Event>, AbortOnDrop)> {
        let socket = self.connection.socket_mut().socket_mut();
        for group in [
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Ipv4Rule,
            MulticastGroup::Ipv6Rule,
            // Not `Nexthop`: netlink-packet-route cannot parse nexthop
            // objects' messages, and with the kernel's default
            // `nexthop_compat_mode` a nexthop change also notifies the routes
            // that use it.
        ] {
            socket.add_membership(group as u32)?;
        }
        if let Err(err) = socket.set_rx_buf_sz(EVENT_BUFFER_BYTES) {
            debug!("next hops: cannot enlarge the notification buffer: {err}");
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("no tokio runtime"))?;
        let connection = AbortOnDrop(runtime.spawn(self.connection));
        Ok((self.messages, connection))
    }
}

async fn next_event(events: &mut Option<BoxStream<'static, Event>>) -> Option<Event> {
    match events {
        Some(messages) => messages.next().await,
        None => std::future::pending().await,
    }
}

/// Ends a spawned netlink connection with its owner, which would otherwise
/// keep its socket open for as long as the runtime lives.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A neighbour table entry's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Neighbour {
    ifindex: u32,
    addr: IpAddr,
}

struct Lookup {
    resolution: Resolution,
    neighbour: Neighbour,
    /// The entry has a MAC the kernel has not confirmed lately.
    stale: bool,
}

struct Route {
    ifindex: u32,
    gateway: Option<IpAddr>,
    mtu: Option<u32>,
}

struct Link {
    mac: [u8; 6],
    mtu: u32,
}

/// The request socket and how lookups are made.
struct Rtnl {
    handle: Handle,
    source_v4: Option<Ipv4Addr>,
    source_v6: Option<Ipv6Addr>,
    _connection: AbortOnDrop,
}

impl Rtnl {
    async fn lookup(&self, backend: IpAddr) -> Result<Lookup, NextHopError> {
        let route = self.route(backend).await?;
        let link = self.link(route.ifindex, backend).await?;
        let neighbour = Neighbour {
            ifindex: route.ifindex,
            addr: route.gateway.unwrap_or(backend),
        };
        // A route's `mtu` (or a learnt path MTU) below the link's is the one
        // the kernel would honour.
        let mtu = route
            .mtu
            .filter(|mtu| *mtu > 0)
            .map_or(link.mtu, |mtu| mtu.min(link.mtu));
        let (resolution, stale) = match self.neighbour_mac(neighbour).await? {
            Some((dmac, stale)) => (
                Resolution::Resolved(NextHop {
                    ifindex: route.ifindex,
                    mtu,
                    dmac,
                    smac: link.mac,
                    flags: NEXTHOP_F_VALID,
                }),
                stale,
            ),
            None => (
                Resolution::Pending {
                    ifindex: route.ifindex,
                    neighbour: neighbour.addr,
                },
                false,
            ),
        };
        Ok(Lookup {
            resolution,
            neighbour,
            stale,
        })
    }

    /// `ip route get BACKEND [from SOURCE]`.
    async fn route(&self, backend: IpAddr) -> Result<Route, NextHopError> {
        let mut request = RouteMessage::default();
        request.header.address_family = family(backend);
        request.header.destination_prefix_length = host_prefix_len(backend);
        request
            .attributes
            .push(RouteAttribute::Destination(route_address(backend)));
        let source = match backend {
            IpAddr::V4(_) => self.source_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.source_v6.map(IpAddr::V6),
        };
        if let Some(source) = source {
            request.header.source_prefix_length = host_prefix_len(source);
            request
                .attributes
                .push(RouteAttribute::Source(route_address(source)));
        }
        let reply = match self.handle.route().get(request).execute().next().await {
            Some(Ok(reply)) => reply,
            Some(Err(err)) => {
                return Err(match errno(&err) {
                    // Blackhole routes answer EINVAL, prohibit ones EACCES.
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL) => {
                        NextHopError::Unreachable(backend)
                    }
                    _ => NextHopError::Netlink(err),
                });
            }
            None => return Err(NextHopError::BadReply("no answer to a route lookup")),
        };
        if reply.header.kind != RouteType::Unicast {
            return Err(NextHopError::NotUnicast {
                backend,
                kind: reply.header.kind,
            });
        }
        let mut ifindex = None;
        let mut gateway = None;
        let mut mtu = None;
        for attribute in reply.attributes {
            match attribute {
                RouteAttribute::Oif(index) => ifindex = Some(index),
                RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gateway = Some(IpAddr::V4(v4)),
                RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gateway = Some(IpAddr::V6(v6)),
                // An IPv4 route through an IPv6 gateway (RFC 5549).
                RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some(IpAddr::V4(v4)),
                RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(IpAddr::V6(v6)),
                RouteAttribute::Metrics(metrics) => {
                    for metric in metrics {
                        if let RouteMetric::Mtu(value) = metric {
                            mtu = Some(value);
                        }
                    }
                }
                _ => {}
            }
        }
        let ifindex = ifindex.ok_or(NextHopError::BadReply("route without an output interface"))?;
        Ok(Route {
            ifindex,
            gateway,
            mtu,
        })
    }

    async fn link(&self, ifindex: u32, backend: IpAddr) -> Result<Link, NextHopError> {
        let reply: LinkMessage = match self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .next()
            .await
        {
            Some(Ok(reply)) => reply,
            Some(Err(err)) => return Err(NextHopError::Netlink(err)),
            None => return Err(NextHopError::BadReply("no answer to a link lookup")),
        };
        if reply.header.link_layer_type != LinkLayerType::Ether {
            return Err(NextHopError::NotEthernet { backend, ifindex });
        }
        if !reply
            .header
            .flags
            .contains(LinkFlags::Up | LinkFlags::LowerUp)
        {
            return Err(NextHopError::LinkDown { backend, ifindex });
        }
        let mut mac = None;
        let mut mtu = None;
        for attribute in reply.attributes {
            match attribute {
                LinkAttribute::Address(address) => {
                    mac = <[u8; 6]>::try_from(address.as_slice()).ok()
                }
                LinkAttribute::Mtu(value) => mtu = Some(value),
                _ => {}
            }
        }
        match (mac, mtu) {
            (Some(mac), Some(mtu)) => Ok(Link { mac, mtu }),
            (None, _) => Err(NextHopError::NotEthernet { backend, ifindex }),
            (_, None) => Err(NextHopError::BadReply("link without an MTU")),
        }
    }

    /// The neighbour's MAC and whether it is stale, or `None` while the
    /// kernel has no usable entry. Asks for the one entry rather than dumping
    /// the table, which may be large.
    async fn neighbour_mac(
        &self,
        neighbour: Neighbour,
    ) -> Result<Option<([u8; 6], bool)>, NextHopError> {
        let request = neighbour_message(neighbour);
        let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(request));
        message.header.flags = NLM_F_REQUEST;
        let mut replies = self
            .handle
            .clone()
            .request(message)
            .map_err(NextHopError::Netlink)?;
        let entry = match replies.next().await.map(|reply| reply.payload) {
            Some(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry))) => entry,
            Some(NetlinkPayload::Error(err)) if err.raw_code() == -libc::ENOENT => return Ok(None),
            Some(NetlinkPayload::Error(err)) => {
                return Err(NextHopError::Netlink(rtnetlink::Error::NetlinkError(err)));
            }
            _ => return Err(NextHopError::BadReply("no answer to a neighbour lookup")),
        };
        let state = entry.header.state;
        if u16::from(state) & NUD_VALID == 0 {
            return Ok(None);
        }
        let mac = entry
            .attributes
            .into_iter()
            .find_map(|attribute| match attribute {
                NeighbourAttribute::LinkLayerAddress(address) => {
                    <[u8; 6]>::try_from(address.as_slice()).ok()
                }
                _ => None,
            });
        Ok(mac.map(|mac| (mac, state == NeighbourState::Stale)))
    }

    /// Makes the kernel (re)resolve a neighbour: RTM_NEWNEIGH with NTF_USE
    /// acts as if a packet were queued to it, creating the entry if needed
    /// and sending the ARP request or neighbour solicitation (or, for a stale
    /// entry, a unicast confirmation probe) on that link only. Cilium
    /// resolves its next hops the same way.
    async fn trigger(&self, neighbour: Neighbour) -> Result<(), NextHopError> {
        let mut request = neighbour_message(neighbour);
        request.header.flags = NeighbourFlags::Use;
        let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(request));
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let mut replies = self
            .handle
            .clone()
            .request(message)
            .map_err(NextHopError::Netlink)?;
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(err) = reply.payload
                && err.code.is_some()
            {
                return Err(NextHopError::Netlink(rtnetlink::Error::NetlinkError(err)));
            }
        }
        Ok(())
    }
}

/// The key of a neighbour request. State and type stay zero: the kernel
/// refuses a get request with either set, and NTF_USE ignores them.
fn neighbour_message(neighbour: Neighbour) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = family(neighbour.addr);
    message.header.ifindex = neighbour.ifindex;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match neighbour.addr {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    message
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn host_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// The positive errno of a kernel refusal.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// When to ask the kernel again about a neighbour that does not answer.
struct Backoff {
    next: Instant,
    delay: Duration,
}

/// The receiver of `updates` is gone.
struct Stopped;

/// Which targets a pass looks up again.
enum Scope {
    All,
    /// The users of these neighbours: a neighbour's change affects no one
    /// else, and on a busy host (every resolved neighbour turns stale and is
    /// re-confirmed about twice a minute) neighbour notifications are by far
    /// the most frequent.
    Neighbours(HashSet<Neighbour>),
}

impl Scope {
    fn none() -> Self {
        Scope::Neighbours(HashSet::new())
    }

    fn add(&mut self, neighbour: Neighbour) {
        if let Scope::Neighbours(neighbours) = self {
            neighbours.insert(neighbour);
        }
    }
}

/// What a notification means for the targets.
enum Concern {
    Nothing,
    Everything,
    Neighbour(Neighbour),
}

/// The state `track` keeps between passes.
struct Tracker<'a> {
    rtnl: &'a Rtnl,
    /// What the receiver last got, for the ids whose last update was `Some`.
    sent: HashMap<u32, NextHop>,
    /// The last error logged per id, to log each new one once.
    errors: HashMap<u32, String>,
    /// Each target's neighbour at its last lookup, and the reverse.
    neighbour_of: HashMap<u32, Neighbour>,
    users: HashMap<Neighbour, HashSet<u32>>,
    unresolved: HashMap<Neighbour, Backoff>,
    /// The earliest retry of an unresolved neighbour.
    retry_at: Option<Instant>,
}

impl<'a> Tracker<'a> {
    fn new(rtnl: &'a Rtnl) -> Self {
        Self {
            rtnl,
            sent: HashMap::new(),
            errors: HashMap::new(),
            neighbour_of: HashMap::new(),
            users: HashMap::new(),
            unresolved: HashMap::new(),
            retry_at: None,
        }
    }

    fn concerns(&self, (message, _): &Event) -> Concern {
        let entry = match &message.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewNeighbour(entry) | RouteNetlinkMessage::DelNeighbour(entry),
            ) => entry,
            // Links, routes, rules, and overruns (notifications were lost).
            _ => return Concern::Everything,
        };
        // Bridge FDB entries share the group.
        if !matches!(
            entry.header.family,
            AddressFamily::Inet | AddressFamily::Inet6
        ) {
            return Concern::Nothing;
        }
        let addr = entry
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    Some(IpAddr::V6(*v6))
                }
                _ => None,
            });
        let Some(addr) = addr else {
            return Concern::Everything;
        };
        let neighbour = Neighbour {
            ifindex: entry.header.ifindex,
            addr,
        };
        if self.users.contains_key(&neighbour) {
            Concern::Neighbour(neighbour)
        } else {
            Concern::Nothing
        }
    }

    /// The unresolved neighbours whose retry is due.
    fn due(&self, now: Instant) -> impl Iterator<Item = Neighbour> + '_ {
        self.unresolved
            .iter()
            .filter(move |(_, backoff)| backoff.next <= now)
            .map(|(neighbour, _)| *neighbour)
    }

    /// Looks the targets in `scope` up again, sends what changed, and asks
    /// the kernel about the neighbours that need it.
    async fn pass(
        &mut self,
        targets: &BTreeMap<u32, IpAddr>,
        scope: &Scope,
        updates: &mpsc::Sender<(u32, Option<NextHop>)>,
    ) -> Result<(), Stopped> {
        let chosen: Vec<(u32, IpAddr)> = match scope {
            Scope::All => targets.iter().map(|(id, addr)| (*id, *addr)).collect(),
            Scope::Neighbours(neighbours) => neighbours
                .iter()
                .filter_map(|neighbour| self.users.get(neighbour))
                .flatten()
                .copied()
                .collect::<HashSet<u32>>()
                .into_iter()
                .filter_map(|id| targets.get(&id).map(|addr| (id, *addr)))
                .collect(),
        };
        let rtnl = self.rtnl;
        let mut lookups = stream::iter(chosen)
            .map(|(id, addr)| async move { (id, addr, rtnl.lookup(addr).await) })
            .buffer_unordered(CONCURRENT_LOOKUPS);
        let now = Instant::now();
        let mut to_trigger = HashSet::new();
        while let Some((id, addr, result)) = lookups.next().await {
            let next_hop = self.record(id, addr, result, now, &mut to_trigger);
            self.send(id, next_hop, updates).await?;
        }
        drop(lookups);

        if let Scope::All = scope {
            let gone: Vec<u32> = self
                .neighbour_of
                .keys()
                .chain(self.sent.keys())
                .chain(self.errors.keys())
                .filter(|id| !targets.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                self.forget(id);
                self.send(id, None, updates).await?;
            }
        }
        let users = &self.users;
        self.unresolved
            .retain(|neighbour, _| users.contains_key(neighbour));
        self.retry_at = self.unresolved.values().map(|backoff| backoff.next).min();

        for neighbour in to_trigger {
            if let Err(err) = self.rtnl.trigger(neighbour).await {
                warn!(
                    "next hops: cannot trigger resolution of {} on interface {}: {err}",
                    neighbour.addr, neighbour.ifindex
                );
            }
        }
        Ok(())
    }

    /// Takes in one target's lookup and returns its next hop, if usable.
    fn record(
        &mut self,
        id: u32,
        addr: IpAddr,
        result: Result<Lookup, NextHopError>,
        now: Instant,
        to_trigger: &mut HashSet<Neighbour>,
    ) -> Option<NextHop> {
        self.forget_neighbour(id);
        let lookup = match result {
            Ok(lookup) => lookup,
            Err(err) => {
                let text = err.to_string();
                if self.errors.get(&id) != Some(&text) {
                    warn!("next hops: backend {id} ({addr}): {text}");
                    self.errors.insert(id, text);
                }
                return None;
            }
        };
        self.errors.remove(&id);
        let neighbour = lookup.neighbour;
        self.neighbour_of.insert(id, neighbour);
        self.users.entry(neighbour).or_default().insert(id);
        match lookup.resolution {
            Resolution::Resolved(next_hop) => {
                self.unresolved.remove(&neighbour);
                if lookup.stale {
                    to_trigger.insert(neighbour);
                }
                Some(next_hop)
            }
            Resolution::Pending { .. } => {
                let backoff = self.unresolved.entry(neighbour).or_insert(Backoff {
                    next: now,
                    delay: RETRY_FIRST,
                });
                if backoff.next <= now {
                    to_trigger.insert(neighbour);
                    backoff.next = now + backoff.delay;
                    backoff.delay = (backoff.delay * 2).min(RETRY_MAX);
                }
                None
            }
        }
    }

    fn forget_neighbour(&mut self, id: u32) {
        if let Some(neighbour) = self.neighbour_of.remove(&id)
            && let Some(users) = self.users.get_mut(&neighbour)
        {
            users.remove(&id);
            if users.is_empty() {
                self.users.remove(&neighbour);
            }
        }
    }

    fn forget(&mut self, id: u32) {
        self.forget_neighbour(id);
        self.errors.remove(&id);
    }

    async fn send(
        &mut self,
        id: u32,
        next_hop: Option<NextHop>,
        updates: &mpsc::Sender<(u32, Option<NextHop>)>,
    ) -> Result<(), Stopped> {
        if self.sent.get(&id) == next_hop.as_ref() {
            return Ok(());
        }
        match next_hop {
            Some(next_hop) => {
                debug!(
                    "next hops: backend {id} now leaves through interface {} to {}",
                    next_hop.ifindex,
                    format_mac(&next_hop.dmac)
                );
                self.sent.insert(id, next_hop);
            }
            None => {
                debug!("next hops: backend {id} has no usable next hop");
                self.sent.remove(&id);
            }
        }
        updates.send((id, next_hop)).await.map_err(|_| Stopped)
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::future::Future;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures_util::FutureExt;
    use tokio::sync::mpsc::error::TryRecvError;

    const WAIT: Duration = Duration::from_secs(10);

    const NODE_1: [u8; 6] = [0x02, 0, 0, 0, 0xa1, 0x01];
    const PEER_1: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x01];
    const NODE_2: [u8; 6] = [0x02, 0, 0, 0, 0xa2, 0x01];
    const PEER_2: [u8; 6] = [0x02, 0, 0, 0, 0xb2, 0x01];

    /// Namespaces need root. A developer without it skips; CI must not.
    fn privileged() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "the next-hop tests need root, and CI is set"
        );
        eprintln!("skipped: the next-hop tests need root");
        false
    }

    fn ip_in(netns: &str, args: &str) {
        let status = Command::new("ip")
            .args(["-n", netns])
            .args(args.split_whitespace())
            .status()
            .expect("run ip");
        assert!(status.success(), "ip -n {netns} {args}: {status}");
    }

    /// Runs `f` on a thread of its own moved into the namespace, so that the
    /// test's other threads, and the machine's interfaces, are untouched.
    fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{netns}");
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open the namespace");
            // SAFETY: the fd is valid for the call; setns moves only this
            // thread, which ends with `f`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// A network namespace that is deleted however the test ends.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "xlb-nh-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("run ip");
            assert!(status.success(), "ip netns add {name}: {status}");
            let netns = Self { name };
            // Without duplicate address detection, IPv6 addresses (the
            // link-local one that neighbour solicitations come from
            // included) work at once instead of a second or two later.
            in_netns(&netns.name, || {
                for knob in ["all", "default"] {
                    let path = format!("/proc/sys/net/ipv6/conf/{knob}/accept_dad");
                    std::fs::write(&path, "0").expect("disable DAD");
                }
            });
            netns.ip("link set lo up");
            netns
        }

        fn ip(&self, args: &str) {
            ip_in(&self.name, args);
        }

        /// Runs an async test body on a current-thread runtime inside the
        /// namespace.
        fn block_on<T, Fut>(&self, f: impl FnOnce(String) -> Fut + Send + 'static) -> T
        where
            T: Send + 'static,
            Fut: Future<Output = T>,
        {
            let name = self.name.clone();
            in_netns(&self.name, move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(f(name))
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn mac(bytes: [u8; 6]) -> String {
        format_mac(&bytes)
    }

    /// The xlb node and a peer that owns the backends' (or gateways')
    /// addresses on two links, so that ARP and ND get answers:
    /// va1 198.18.1.1 fd00:1::1 -- vb1 198.18.1.2 fd00:1::2,
    /// va2 198.18.2.1 fd00:2::1 -- vb2 198.18.2.2 fd00:2::2.
    fn topology() -> (Netns, Netns) {
        let node = Netns::new();
        let peer = Netns::new();
        for (n, node_mac, peer_mac) in [(1, NODE_1, PEER_1), (2, NODE_2, PEER_2)] {
            node.ip(&format!(
                "link add va{n} address {} mtu 1600 type veth \
                 peer name vb{n} address {} mtu 1600 netns {}",
                mac(node_mac),
                mac(peer_mac),
                peer.name
            ));
            node.ip(&format!("addr add 198.18.{n}.1/24 dev va{n}"));
            node.ip(&format!("addr add fd00:{n}::1/64 dev va{n}"));
            peer.ip(&format!("addr add 198.18.{n}.2/24 dev vb{n}"));
            peer.ip(&format!("addr add fd00:{n}::2/64 dev vb{n}"));
            node.ip(&format!("link set va{n} up"));
            peer.ip(&format!("link set vb{n} up"));
        }
        (node, peer)
    }

    fn ifindex(name: &str) -> u32 {
        let name = std::ffi::CString::new(name).expect("interface name");
        // SAFETY: a valid NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {name:?}");
        index
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    async fn resolved(resolver: &NextHopResolver, backend: IpAddr) -> NextHop {
        let deadline = Instant::now() + WAIT;
        loop {
            match resolver.resolve(backend).await {
                Ok(Resolution::Resolved(next_hop)) => return next_hop,
                Ok(Resolution::Pending { .. }) => {
                    assert!(Instant::now() < deadline, "{backend} never resolved");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("{backend}: {err}"),
            }
        }
    }

    #[test]
    fn needs_a_runtime() {
        let created = NextHopResolver::new().now_or_never();
        assert!(matches!(created, Some(Err(NextHopError::NoRuntime))));
    }

    #[test]
    fn direct_backends_resolve_once_the_kernel_was_asked() {
        if !privileged() {
            return;
        }
        let (node, _peer) = topology();
        node.block_on(|_| async {
            let resolver = NextHopResolver::new().await.expect("resolver");
            let va1 = ifindex("va1");
            for backend in [addr("198.18.1.2"), addr("fd00:1::2")] {
                // Nothing has talked to the peer yet: only the trigger can
                // make the kernel learn its MAC.
                assert_eq!(
                    resolver.resolve(backend).await.expect("resolve"),
                    Resolution::Pending {
                        ifindex: va1,
                        neighbour: backend
                    }
                );
                assert_eq!(
                    resolved(&resolver, backend).await,
                    NextHop {
                        ifindex: va1,
                        mtu: 1600,
                        dmac: PEER_1,
                        smac: NODE_1,
                        flags: NEXTHOP_F_VALID,
                    },
                    "{backend}"
                );
            }
        });
    }

    #[test]
    fn backends_behind_a_gateway_get_its_mac() {
        if !privileged() {
            return;
        }
        let (node, _peer) = topology();
        node.ip("route add 198.19.0.0/24 via 198.18.1.2 mtu 1400");
        node.ip("-6 route add fd00:99::/64 via fd00:1::2");
        // Encapsulated packets sourced from va2's address go out va2.
        node.ip("rule add from 198.18.2.1 lookup 100");
        node.ip("route add 198.19.0.0/24 via 198.18.2.2 table 100");
        node.block_on(|_| async {
            let resolver = NextHopResolver::new().await.expect("resolver");
            let (va1, va2) = (ifindex("va1"), ifindex("va2"));
            assert_eq!(
                resolved(&resolver, addr("198.19.0.10")).await,
                NextHop {
                    ifindex: va1,
                    // The route's MTU, below the link's.
                    mtu: 1400,
                    dmac: PEER_1,
                    smac: NODE_1,
                    flags: NEXTHOP_F_VALID,
                }
            );
            assert_eq!(
                resolver
                    .resolve(addr("fd00:99::10"))
                    .await
                    .expect("resolve"),
                Resolution::Pending {
                    ifindex: va1,
                    neighbour: addr("fd00:1::2")
                }
            );
            assert_eq!(
                resolved(&resolver, addr("fd00:99::10")).await,
                NextHop {
                    ifindex: va1,
                    mtu: 1600,
                    dmac: PEER_1,
                    smac: NODE_1,
                    flags: NEXTHOP_F_VALID,
                }
            );

            let sourced = NextHopResolver::new()
                .await
                .expect("resolver")
                .with_source(addr("198.18.2.1"));
            assert_eq!(
                resolved(&sourced, addr("198.19.0.10")).await,
                NextHop {
                    ifindex: va2,
                    mtu: 1600,
                    dmac: PEER_2,
                    smac: NODE_2,
                    flags: NEXTHOP_F_VALID,
                }
            );
        });
    }

    #[test]
    fn unusable_routes_are_typed_errors() {
        if !privileged() {
            return;
        }
        let (node, peer) = topology();
        node.ip("route add blackhole 198.19.201.0/24");
        node.ip("-6 route add prohibit fd00:beef::/64");
        node.ip("addr add 198.18.3.1/32 dev lo");
        node.ip("route add 198.19.0.0/24 via 198.18.1.2");
        // va1 keeps its routes but loses its carrier.
        peer.ip("link set vb1 down");
        node.block_on(|_| async {
            let resolver = NextHopResolver::new().await.expect("resolver");
            for backend in [
                "198.19.200.1",
                "fd00:dead::1",
                "198.19.201.1",
                "fd00:beef::1",
            ] {
                let backend = addr(backend);
                match resolver.resolve(backend).await {
                    Err(NextHopError::Unreachable(to)) => assert_eq!(to, backend),
                    other => panic!("{backend}: {other:?}"),
                }
            }
            match resolver.resolve(addr("198.18.3.1")).await {
                Err(NextHopError::NotUnicast { kind, .. }) => assert_eq!(kind, RouteType::Local),
                other => panic!("local address: {other:?}"),
            }
            let va1 = ifindex("va1");
            match resolver.resolve(addr("198.19.0.10")).await {
                Err(NextHopError::LinkDown { ifindex, .. }) => assert_eq!(ifindex, va1),
                other => panic!("link without carrier: {other:?}"),
            }
        });
    }

    /// Applies updates to `seen` until `done` holds.
    async fn until(
        updates: &mut mpsc::Receiver<(u32, Option<NextHop>)>,
        seen: &mut BTreeMap<u32, Option<NextHop>>,
        what: &str,
        done: impl Fn(&BTreeMap<u32, Option<NextHop>>) -> bool,
    ) {
        let deadline = Instant::now() + WAIT;
        while !done(seen) {
            match tokio::time::timeout_at(deadline, updates.recv()).await {
                Ok(Some((id, next_hop))) => {
                    seen.insert(id, next_hop);
                }
                Ok(None) => panic!("{what}: the tracker stopped"),
                Err(_) => panic!("{what}: not within {WAIT:?}; got {seen:?}"),
            }
        }
    }

    #[test]
    fn tracker_follows_route_changes() {
        if !privileged() {
            return;
        }
        let (node, _peer) = topology();
        node.ip("route add 198.19.0.0/24 via 198.18.1.2");
        node.block_on(|netns| async move {
            let resolver = NextHopResolver::new().await.expect("resolver");
            let (va1, va2) = (ifindex("va1"), ifindex("va2"));
            let (targets, targets_rx) = watch::channel(BTreeMap::from([
                (7, addr("198.19.0.10")),
                (8, addr("fd00:2::2")),
                // Nobody answers for it.
                (9, addr("198.18.1.99")),
            ]));
            let (updates_tx, mut updates) = mpsc::channel(16);
            let tracker = tokio::spawn(resolver.track(targets_rx, updates_tx));
            let mut seen = BTreeMap::new();

            let via = |ifindex, dmac, smac| {
                Some(NextHop {
                    ifindex,
                    mtu: 1600,
                    dmac,
                    smac,
                    flags: NEXTHOP_F_VALID,
                })
            };
            let first_gateway = via(va1, PEER_1, NODE_1);
            let second_gateway = via(va2, PEER_2, NODE_2);
            until(&mut updates, &mut seen, "first resolution", |seen| {
                seen.get(&7) == Some(&first_gateway) && seen.get(&8) == Some(&second_gateway)
            })
            .await;

            // A change that moves no target sends nothing.
            ip_in(&netns, "route add 198.19.5.0/24 via 198.18.1.2");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(updates.try_recv(), Err(TryRecvError::Empty));

            ip_in(&netns, "route replace 198.19.0.0/24 via 198.18.2.2");
            until(&mut updates, &mut seen, "the new gateway", |seen| {
                seen.get(&7) == Some(&second_gateway)
            })
            .await;

            // A neighbour's change reaches the targets behind it.
            let moved = [0x02, 0, 0, 0, 0xb2, 0xff];
            ip_in(
                &netns,
                &format!(
                    "neigh replace 198.18.2.2 lladdr {} dev va2 nud permanent",
                    mac(moved)
                ),
            );
            until(&mut updates, &mut seen, "the neighbour's new MAC", |seen| {
                seen.get(&7) == Some(&via(va2, moved, NODE_2))
            })
            .await;

            targets.send_modify(|targets| {
                targets.remove(&8);
            });
            until(&mut updates, &mut seen, "the removed target", |seen| {
                seen.get(&8) == Some(&None)
            })
            .await;

            assert!(!seen.contains_key(&9), "{seen:?}");

            drop(targets);
            tokio::time::timeout(WAIT, tracker)
                .await
                .expect("the tracker stops with its targets")
                .expect("the tracker does not panic");
        });
    }
}
