//! A paced UDP stream from a host in a namespace, for tests that change
//! the data plane under traffic and count what got through.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use xlb::topology::Host;

/// How the stream is shaped: `flows` source ports, each sending `burst`
/// datagrams per round, with `pause` between rounds. Paced so that no queue
/// before the balancer overflows: a drop there would not be the
/// balancer's.
pub struct Pacing {
    pub flows: usize,
    pub burst: usize,
    pub pause: Duration,
}

pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<(u64, u64)>,
}

impl UdpStream {
    /// Starts sending from `from` (an address of `host`) to `to`; each
    /// datagram carries its sequence number.
    pub fn start(host: &Host, from: IpAddr, to: SocketAddr, pacing: Pacing) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = Arc::clone(&stop);
            let host = host.clone();
            thread::spawn(move || {
                host.run_in(|| {
                    let sockets: Vec<UdpSocket> = (0..pacing.flows)
                        .map(|_| UdpSocket::bind((from, 0)).expect("binding"))
                        .collect();
                    let (mut sent, mut failed) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        for socket in &sockets {
                            for _ in 0..pacing.burst {
                                match socket.send_to(&sent.to_be_bytes(), to) {
                                    Ok(_) => sent += 1,
                                    Err(_) => failed += 1,
                                }
                            }
                        }
                        thread::sleep(pacing.pause);
                    }
                    (sent, failed)
                })
                .expect("entering the sender's namespace")
            })
        };
        Self { stop, sender }
    }

    /// Stops the stream; returns how many datagrams were sent and how many
    /// sends failed.
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.sender.join().expect("the sender thread")
    }
}
