//! One connection shared by the clients of many threads.
//!
//! A [`crate::Client`] is bound to the thread that made it, and by default owns a connection, and so an
//! amiquip I/O thread, of its own. Eight threads with eight connections make eight I/O threads
//! compete for the cores. A [`SharedConnection`] is one connection that any thread can open
//! clients on ([`crate::Client::on_shared`]): each client then has its own channel and reply queue on it, so no thread
//! waits on another's call, and the lock is held only while a channel is opened.

use std::sync::{Arc, Mutex, MutexGuard};

use amiquip::{Channel, Connection};
use log::{debug, warn};

use crate::connect::{Brokers, ConnectOptions};
use crate::error::Result;

/// A connection that clients on many threads share; cheap to clone, `Send` and `Sync`.
///
/// ```no_run
/// use amqp_rpc::{Client, ClientOptions, ConnectOptions, SharedConnection};
///
/// # fn main() -> amqp_rpc::Result<()> {
/// let shared = SharedConnection::open(amqp_rpc::DEFAULT_URL, ConnectOptions::default())?;
/// let threads: Vec<_> = (0..8)
///     .map(|_| {
///         let shared = shared.clone();
///         std::thread::spawn(move || -> amqp_rpc::Result<()> {
///             let mut client = Client::on_shared(&shared, ClientOptions::default())?;
///             client.fib(30)?;
///             client.close()
///         })
///     })
///     .collect();
/// for thread in threads {
///     thread.join().unwrap()?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SharedConnection {
    inner: Arc<Inner>,
}

struct Inner {
    brokers: Brokers,
    options: ConnectOptions,
    /// `None` after a failed reconnection; the next channel request tries again.
    connection: Mutex<Option<Connection>>,
}

impl SharedConnection {
    /// Connects to the broker at `url`, or to the first that answers of several URLs separated
    /// by commas; after a connection loss, to whichever answers next.
    ///
    /// # Errors
    ///
    /// Those of [`crate::Client::with_options`] when it connects.
    pub fn open(url: &str, options: ConnectOptions) -> Result<SharedConnection> {
        let brokers = Brokers::parse(url)?;
        let connection = brokers.connect(&options)?;
        Ok(SharedConnection {
            inner: Arc::new(Inner {
                brokers,
                options,
                connection: Mutex::new(Some(connection)),
            }),
        })
    }

    /// Opens a channel, first connecting again if the connection is gone.
    pub(crate) fn open_channel(&self) -> Result<Channel> {
        let mut connection = self.lock();
        if let Some(open) = connection.as_mut() {
            match open.open_channel(None) {
                Ok(channel) => return Ok(channel),
                Err(error) => warn!("the shared connection is gone ({error}); reconnecting"),
            }
        }
        // Drop (and so quietly close) the dead connection before making the next.
        *connection = None;
        let mut fresh = self.inner.brokers.connect(&self.inner.options)?;
        let channel = fresh.open_channel(None)?;
        debug!("shared connection re-established");
        *connection = Some(fresh);
        Ok(channel)
    }

    /// Closes the connection now, ending every client on it.
    ///
    /// # Errors
    ///
    /// [`crate::Error::ConnectionLost`] or [`crate::Error::Amqp`] when the broker does not
    /// confirm the close.
    pub fn close(&self) -> Result<()> {
        match self.lock().take() {
            Some(connection) => Ok(connection.close()?),
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        // A panic elsewhere while the lock was held leaves the Option whole: keep using it.
        self.inner
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
