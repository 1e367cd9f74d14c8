//! A fault-injecting TCP proxy between a test's clients or servers and the broker.
//!
//! It forwards every connection it accepts to the broker, and on demand cuts them all (as a
//! network failure would) or freezes them (a peer that goes silent without closing), or lets
//! new ones complete the AMQP handshake, or pass a number of TLS records, and then silences
//! the broker. It also
//! knows the local port of each upstream connection, which is how the broker names it, so a
//! test can have `rabbitmqctl` close exactly its own connections.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use amqp_rpc::Error;

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
    /// Set by [`FaultProxy::forward_tls_records`]: the broker's TLS records a new connection
    /// passes before the broker goes silent on it (`None`: its bytes are not read as records).
    tls_record_limit: Arc<Mutex<Option<usize>>>,
    /// The TLS records the broker has sent on the latest connection, when they are counted.
    tls_records: Arc<AtomicUsize>,
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
            tls_record_limit: Arc::default(),
            tls_records: Arc::default(),
            stopped: Arc::default(),
        };
        let (links, frozen, silent_after_handshake, stopped) = (
            Arc::clone(&proxy.links),
            Arc::clone(&proxy.frozen),
            Arc::clone(&proxy.silent_after_handshake),
            Arc::clone(&proxy.stopped),
        );
        let (tls_record_limit, tls_records) = (
            Arc::clone(&proxy.tls_record_limit),
            Arc::clone(&proxy.tls_records),
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
                let tls_record_limit = *tls_record_limit.lock().unwrap();
                if let Some(limit) = tls_record_limit {
                    tls_records.store(0, Ordering::SeqCst);
                    let counted = Arc::clone(&tls_records);
                    // A TLS record is a type octet, a 2-octet version, a 2-octet length and
                    // that many octets.
                    forward_until_silent(&upstream, &downstream, move |bytes| {
                        let length = 5 + usize::from(u16::from_be_bytes(
                            bytes.get(3..5)?.try_into().unwrap(),
                        ));
                        (bytes.len() >= length).then(|| {
                            let silent = counted.load(Ordering::SeqCst) == limit;
                            if !silent {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            (length, silent)
                        })
                    });
                } else if silent_after_handshake.load(Ordering::SeqCst) {
                    // An AMQP frame is a type octet, a 2-octet channel, a 4-octet payload
                    // size, the payload and an end octet. Channel 0 is the connection's own,
                    // where the handshake happens: the first frame on another (the answer to
                    // the first channel.open) is not forwarded.
                    forward_until_silent(&upstream, &downstream, |bytes| {
                        let size = u32::from_be_bytes(bytes.get(3..7)?.try_into().unwrap());
                        let length = 7 + size as usize + 1;
                        let channel = u16::from_be_bytes([bytes[1], bytes[2]]);
                        (bytes.len() >= length).then_some((length, channel != 0))
                    });
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
    /// from the broker, as from a broker that stops answering right after it.
    pub fn go_silent_after_handshakes(&self) {
        self.silent_after_handshake.store(true, Ordering::SeqCst);
    }

    /// From now on, new connections pass the broker's TLS records one by one, counted in
    /// [`FaultProxy::tls_records`], and after `limit` of them hear nothing more from the
    /// broker: as from a broker that stops answering at a given point of a TLS connection,
    /// which a proxy cannot read. `usize::MAX` passes them all.
    pub fn forward_tls_records(&self, limit: usize) {
        *self.tls_record_limit.lock().unwrap() = Some(limit);
    }

    /// The TLS records that the broker sent and the proxy passed on the latest connection,
    /// once [`FaultProxy::forward_tls_records`] has been called.
    pub fn tls_records(&self) -> usize {
        self.tls_records.load(Ordering::SeqCst)
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

/// Copies the broker's bytes from `from` to `to` on a thread of its own, a unit (a frame, a
/// record) at a time, as `next_unit` cuts them: given the bytes not yet passed, it returns the
/// length of the first unit and whether the broker goes silent from it on, or `None` until the
/// unit has arrived whole. Once silent, everything is dropped, heartbeats included.
fn forward_until_silent(
    from: &TcpStream,
    to: &TcpStream,
    mut next_unit: impl FnMut(&[u8]) -> Option<(usize, bool)> + Send + 'static,
) {
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
            while !silent {
                let Some((length, goes_silent)) = next_unit(&pending) else {
                    break;
                };
                if goes_silent {
                    silent = true;
                } else if to.write_all(&pending[..length]).is_err() {
                    return;
                } else {
                    pending.drain(..length);
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Asserts that a connect to a broker gone silent (see [`FaultProxy::go_silent_after_handshakes`]
/// and [`FaultProxy::forward_tls_records`]) failed as [`Error::Connect`], with `words` in its
/// message, within 4 s: twice the 2 s connect timeout that the tests give it. Without a bound
/// it would wait for the heartbeats to run out (20 s).
pub fn assert_failed_to_connect_in_time(error: &Error, waited: Duration, words: &str) {
    assert!(waited < Duration::from_secs(4), "failed after {waited:?}");
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    let message = error.chain();
    assert!(message.contains(words), "{message}");
}
