//! A fault-injecting TCP proxy between a test's clients or servers and the broker.
//!
//! It forwards every connection it accepts to the broker, and on demand cuts them all (as a
//! network failure would) or freezes them (a peer that goes silent without closing), or lets
//! new ones complete the AMQP handshake and then silences the broker. It also
//! knows the local port of each upstream connection, which is how the broker names it, so a
//! test can have `rabbitmqctl` close exactly its own connections.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// One forwarded connection: the accepted side and the broker side.
struct Link {
    downstream: TcpStream,
    upstream: TcpStream,
}

/// A running proxy; it stops accepting when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    broker_url: String,
    links: Arc<Mutex<Vec<Link>>>,
    frozen: Arc<AtomicBool>,
    silent_after_handshake: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on a free local port and forwards to the broker of `broker_url`.
    pub fn start(broker_url: &str) -> FaultProxy {
        let (host, port) = super::host_and_port(broker_url);
        let upstream_address = format!("{host}:{port}");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = FaultProxy {
            address: listener.local_addr().unwrap(),
            broker_url: broker_url.to_string(),
            links: Arc::default(),
            frozen: Arc::default(),
            silent_after_handshake: Arc::default(),
            stopped: Arc::default(),
        };
        let (links, frozen, silent_after_handshake, stopped) = (
            Arc::clone(&proxy.links),
            Arc::clone(&proxy.frozen),
            Arc::clone(&proxy.silent_after_handshake),
            Arc::clone(&proxy.stopped),
        );
        thread::spawn(move || {
            for downstream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(downstream) = downstream else { continue };
                let Ok(upstream) = TcpStream::connect(&upstream_address) else {
                    continue;
                };
                let _ = downstream.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                forward(&downstream, &upstream, &frozen);
                if silent_after_handshake.load(Ordering::SeqCst) {
                    forward_handshake_only(&upstream, &downstream);
                } else {
                    forward(&upstream, &downstream, &frozen);
                }
                links.lock().unwrap().push(Link {
                    downstream,
                    upstream,
                });
            }
        });
        proxy
    }

    /// The broker URL, rewritten to go through this proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&self.broker_url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.address.port())).unwrap();
        url.to_string()
    }

    /// Connections forwarded so far (cut ones included).
    pub fn connections(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    /// Cuts every connection made so far, both ways, as a failed network would. New
    /// connections are still accepted and forwarded.
    pub fn cut_all(&self) {
        for link in self.links.lock().unwrap().iter() {
            let _ = link.downstream.shutdown(Shutdown::Both);
            let _ = link.upstream.shutdown(Shutdown::Both);
        }
    }

    /// Stops forwarding bytes without closing anything: both peers go silent.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Stops accepting: new connections to the proxy's port are refused from now on.
    pub fn refuse_new(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag, and drops the listener.
        let _ = TcpStream::connect(self.address);
    }

    /// From now on, new connections complete the AMQP handshake and then hear nothing more
    /// from the broker, as from a broker that stops answering right after it: see
    /// [`forward_handshake_only`].
    pub fn go_silent_after_handshakes(&self) {
        self.silent_after_handshake.store(true, Ordering::SeqCst);
    }

    /// Forwards bytes again after [`FaultProxy::freeze`].
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// The broker's names for the live connections made through this proxy, as
    /// `rabbitmqctl list_connections name` prints them ("127.0.0.1:PORT -> 127.0.0.1:5672").
    pub fn broker_connection_names(&self) -> Vec<String> {
        self.links
            .lock()
            .unwrap()
            .iter()
            .filter_map(|link| {
                let local = link.upstream.local_addr().ok()?;
                let peer = link.upstream.peer_addr().ok()?;
                Some(format!("{local} -> {peer}"))
            })
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.refuse_new();
        self.cut_all();
    }
}

/// Copies bytes from `from` to `to` on a thread of its own, dropping them while frozen.
fn forward(from: &TcpStream, to: &TcpStream, frozen: &Arc<AtomicBool>) {
    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
    let frozen = Arc::clone(frozen);
    thread::spawn(move || {
        let mut buffer = [0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) if !frozen.load(Ordering::SeqCst) => {
                    if to.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Copies the broker's frames from `from` to `to` on a thread of its own until the first frame
/// on a channel other than 0, the connection's own, where the handshake happens: that frame
/// (the answer to the first `channel.open`) and everything after it are dropped, heartbeats
/// included. An AMQP frame is a type octet, a 2-octet channel, a 4-octet payload size, the
/// payload and an end octet.
fn forward_handshake_only(from: &TcpStream, to: &TcpStream) {
    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
    thread::spawn(move || {
        let (mut pending, mut silent) = (Vec::new(), false);
        let mut buffer = [0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(_) if silent => {}
                Ok(read) => pending.extend_from_slice(&buffer[..read]),
            }
            while !silent && pending.len() >= 7 {
                let channel = u16::from_be_bytes([pending[1], pending[2]]);
                let size = u32::from_be_bytes([pending[3], pending[4], pending[5], pending[6]]);
                let frame_len = 7 + size as usize + 1;
                if pending.len() < frame_len {
                    break;
                }
                if channel != 0 {
                    silent = true;
                    break;
                }
                if to.write_all(&pending[..frame_len]).is_err() {
                    return;
                }
                pending.drain(..frame_len);
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
