//! Listening, accepting and identifying the connections of an incoming migration.
//!
//! One acceptor thread ([`Hub::accept`]) owns the listener for the whole receive: it accepts every
//! connection, reads each one's first bytes without blocking (all of them side by side, in one
//! `poll(2)` loop) and lets the session decide what it is. Identified connections are handed over
//! through the [`Hub`]; the receive thread takes the main stream as soon as it is there and the
//! channels once all of them are. The listener stays open until the receive ends, so a connection
//! that arrives late (a source with more channels than `--channels`, a second source) is identified
//! too and named in the same error whenever it comes.
//!
//! What a connection that is not part of the migration can cost is bounded: a fixed buffer of
//! [`INIT_PACKET_LEN`] bytes, at most [`MAX_PENDING`] of them waiting at once beyond the migration's
//! own connections (the oldest is dropped
//! for a new one), each for at most the io timeout. Such a connection never fails the migration:
//! one that closes before it sends anything (a port probe, a health check), sends bytes that are not
//! a migration's, or does not identify itself within the io timeout is dropped with a log line. A
//! connection that does present itself as part of a migration but is wrong (bad init packet, an id
//! out of range, a duplicate, another uuid) fails the receive at once, naming it.

use std::fs;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use multifd_core::lifecycle::ChannelId;
use multifd_core::recv::{Identity, RecvError};
use multifd_core::wire::DecodeError;
use multifd_core::wire::packet::INIT_PACKET_LEN;

use super::{Conns, Control, Failure, Limits, Options, Place, Report, Session};
use crate::util::{Stall, lock};

/// Most accepted connections waiting to identify themselves at once, beyond the migration's own
/// (the main stream and every channel may all be waiting at once, as in a burst of 255 channels).
pub const MAX_PENDING: usize = 64;

/// How often the acceptor looks at its stop flag, the accept deadline and the signals.
const TICK: Duration = Duration::from_millis(20);

/// How long after a channel closed (while others were missing) the receive fails: time for the
/// connection that made the source give up to arrive and be named instead.
pub(super) const GONE_GRACE: Duration = Duration::from_millis(200);

/// Binds the listener and writes the port file (created beforehand, see [`PortFile`]).
pub(super) fn listen(opts: &Options, port_file: Option<PortFile>, report: &mut Report) -> Result<TcpListener, Failure> {
    let io = |doing| move |error| Failure::Io { place: Place::Listener, doing, error };
    let listener = TcpListener::bind(&opts.listen).map_err(io("binding"))?;
    let bound = listener.local_addr().map_err(io("local_addr"))?;
    report.bound = Some(bound);
    log::info!("listening on {bound} for {} channel{}", opts.channels, plural(opts.channels.into()));
    if let Some(pf) = port_file {
        pf.write(bound.port())?;
    }
    listener.set_nonblocking(true).map_err(io("making the listener non-blocking"))?;
    Ok(listener)
}

/// `"s"` unless `n` is 1.
pub(super) fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The port file, created (under a random temporary name beside it) before the receiver listens, so
/// that an unwritable path fails before any source connects; renamed into place with the port.
pub(super) struct PortFile {
    tmp: tempfile::NamedTempFile,
    path: std::path::PathBuf,
}

impl PortFile {
    /// Creates the temporary file beside `path`, refusing to follow a planted link (`O_EXCL`).
    pub(super) fn create(path: &std::path::Path) -> Result<Self, Failure> {
        let fail =
            |error| Failure::Io { place: Place::Output(path.to_path_buf()), doing: "creating the port file", error };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(fail(io::Error::new(io::ErrorKind::IsADirectory, "is a directory")));
        }
        let tmp = tempfile::Builder::new().prefix(".multifd-port-").tempfile_in(dir).map_err(fail)?;
        Ok(Self { tmp, path: path.to_path_buf() })
    }

    fn write(mut self, port: u16) -> Result<(), Failure> {
        use std::io::Write;
        let fail =
            |error| Failure::Io { place: Place::Output(self.path.clone()), doing: "writing the port file", error };
        writeln!(self.tmp, "{port}").map_err(fail)?;
        let path = self.path.clone();
        self.tmp.persist(&path).map(drop).map_err(|e| fail(e.error))
    }
}

/// What the acceptor hands to the receive, and the first failure of either.
pub(super) struct Hub {
    state: Mutex<HubState>,
    changed: Condvar,
    stop: AtomicBool,
}

struct HubState {
    /// The main stream and the bytes already read from it (its magic), until the receive takes it.
    main: Option<(TcpStream, Vec<u8>)>,
    chans: Vec<Option<TcpStream>>,
    /// Whether the main stream and every channel are in.
    all: bool,
    /// The first failure found by the acceptor (or recorded through [`Hub::fail`]).
    failure: Option<Failure>,
    /// Clones of the identified sockets, shut down on a failure so that no read waits on them.
    sockets: Vec<TcpStream>,
    /// Connections dropped without being identified, and the last reason.
    ignored: usize,
}

impl Hub {
    pub(super) fn new(channels: u8) -> Self {
        let state = HubState {
            main: None,
            chans: (0..channels).map(|_| None).collect(),
            all: false,
            failure: None,
            sockets: Vec::new(),
            ignored: 0,
        };
        Self { state: Mutex::new(state), changed: Condvar::new(), stop: AtomicBool::new(false) }
    }

    /// Records `failure` unless one is recorded already, and shuts every identified socket down:
    /// whatever reads them stops at once.
    pub(super) fn fail(&self, failure: Failure) {
        let mut st = lock(&self.state);
        if st.failure.is_none() {
            st.failure = Some(failure);
        }
        for s in &st.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// The failure recorded, if any.
    pub(super) fn take_failure(&self) -> Option<Failure> {
        lock(&self.state).failure.take()
    }

    /// How many connections were dropped unidentified so far.
    pub(super) fn ignored(&self) -> usize {
        lock(&self.state).ignored
    }

    /// Whether a failure is recorded.
    pub(super) fn failed(&self) -> bool {
        lock(&self.state).failure.is_some()
    }

    /// Tells the acceptor to stop (it does within [`TICK`]); connections after this are refused.
    pub(super) fn stop(&self) {
        // Relaxed: a stop flag, looked at every tick; nothing is published through it.
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits for the main stream; fails with the acceptor's failure.
    pub(super) fn wait_main(&self) -> Result<(TcpStream, Vec<u8>), Failure> {
        let mut st = lock(&self.state);
        loop {
            if st.failure.is_some() {
                return Err(Failure::Recv(RecvError::Terminated));
            }
            if let Some(main) = st.main.take() {
                return Ok(main);
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits up to `timeout` for every connection; `Ok(true)` once all are in.
    pub(super) fn wait_all(&self, timeout: Duration) -> Result<bool, Failure> {
        let st = lock(&self.state);
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| !s.all && s.failure.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if st.failure.is_some() {
            return Err(Failure::Recv(RecvError::Terminated));
        }
        Ok(st.all)
    }

    /// The channels' sockets, once every connection is in.
    pub(super) fn take_channels(&self, main: TcpStream) -> Result<Conns, Failure> {
        let mut st = lock(&self.state);
        match st.chans.iter_mut().map(Option::take).collect::<Option<Vec<_>>>() {
            Some(chans) if st.all => Ok(Conns { main, chans }),
            // Local invariant: called only after `wait_all` said every connection is in.
            _ => Err(Failure::Recv(RecvError::MainNotEnded)),
        }
    }

    /// Accepts and identifies connections until [`Hub::stop`] or a failure; run on its own thread.
    pub(super) fn accept(&self, listener: &TcpListener, session: &Session, limits: &Limits, control: &Control) {
        let mut acc = Acceptor {
            hub: self,
            session,
            limits,
            control,
            pending: Vec::new(),
            fds: Vec::new(),
            watched: Vec::new(),
            gone: None,
            accepted: 0,
            deadline: None,
        };
        // Relaxed: as in `stop`.
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(f) = acc.step(listener) {
                self.fail(f);
                return;
            }
        }
    }
}

/// A connection accepted but not identified yet: the bytes it sent so far.
struct Pending {
    stream: TcpStream,
    index: usize,
    peer: Option<SocketAddr>,
    since: Instant,
    buf: [u8; INIT_PACKET_LEN],
    have: usize,
}

impl Pending {
    fn name(&self) -> String {
        match self.peer {
            Some(p) => format!("connection #{} from {p}", self.index),
            None => format!("connection #{}", self.index),
        }
    }
}

/// What one read told about a pending connection.
enum Seen {
    Waiting,
    Identified(Identity),
    Ignored(String),
}

struct Acceptor<'a> {
    hub: &'a Hub,
    session: &'a Session,
    limits: &'a Limits,
    control: &'a Control,
    pending: Vec<Pending>,
    fds: Vec<libc::pollfd>,
    /// A watched channel that closed, and when: the source gave up.
    gone: Option<(ChannelId, Instant)>,
    /// The channels identified while others are still missing (a second handle on each socket).
    watched: Vec<(ChannelId, std::os::fd::RawFd)>,
    accepted: usize,
    /// When every connection must be in: the accept timeout after the first connection.
    deadline: Option<Instant>,
}

impl Acceptor<'_> {
    /// One round: waits for something to do (at most a tick), then accepts and reads what is ready.
    fn step(&mut self, listener: &TcpListener) -> Result<(), Failure> {
        if let Some(signal) = self.control.stopped() {
            return Err(Failure::Interrupted { signal });
        }
        let all = lock(&self.hub.state).all;
        if !all && self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(self.never_connected());
        }
        if let Some((id, since)) = self.gone
            && !all
            && since.elapsed() >= GONE_GRACE
        {
            return Err(Failure::SourceGone { place: Place::Channel(id), ignored: self.hub.ignored() });
        }
        // Reused from step to step: an idle acceptor allocates nothing while a migration runs.
        let mut fds = std::mem::take(&mut self.fds);
        fds.clear();
        fds.extend(
            std::iter::once(listener.as_raw_fd())
                .chain(self.pending.iter().map(|p| p.stream.as_raw_fd()))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }),
        );
        let watched_at = fds.len();
        if self.gone.is_none() {
            fds.extend(self.watched.iter().map(|&(_, fd)| libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 }));
        }
        let timeout_ms = TICK.as_millis() as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds on descriptors this thread keeps open
        // for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Failure::Io { place: Place::Listener, doing: "waiting for connections", error });
        }
        // A channel that closes while others are still missing: its source gave up (a failed
        // connect of another channel, say); waiting for the accept timeout would change nothing.
        // It fails the receive a moment later, so that the cause of the source's giving up, if it is
        // another connection still on its way in (a bad init packet), is the error reported.
        let hung_up = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
        let closed = self.watched.iter().zip(&fds[watched_at..]).find(|(_, f)| f.revents & hung_up != 0);
        if let Some((&(id, _), _)) = closed {
            self.gone = Some((id, Instant::now()));
        }
        fds.truncate(watched_at);
        // In accept order, so that of two connections claiming one role the first one keeps it.
        let listener_ready = fds[0].revents != 0;
        let mut i = 0;
        // `fds[1 + i]` stays the entry of `pending[i]`: both lose the same element.
        while i < self.pending.len() {
            if fds[1 + i].revents != 0 && self.read_pending(i)? {
                fds.remove(1 + i);
            } else {
                i += 1;
            }
        }
        self.fds = fds;
        self.expire();
        if listener_ready {
            self.accept_ready(listener)?;
        }
        Ok(())
    }

    /// Accepts every connection the listener has.
    fn accept_ready(&mut self, listener: &TcpListener) -> Result<(), Failure> {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer gave up before it was accepted, or this process is out of descriptors
                // for a moment: neither is the migration's problem.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE)) => {
                    log::warn!("accepting a connection: {e}; going on");
                    return Ok(());
                }
                Err(error) => return Err(Failure::Io { place: Place::Listener, doing: "accepting", error }),
            };
            let index = self.accepted;
            self.accepted += 1;
            self.deadline =
                self.deadline.or_else(|| self.limits.accept_timeout.and_then(|t| Instant::now().checked_add(t)));
            if let Err(error) = stream.set_nonblocking(true) {
                log::warn!("connection #{index} from {peer}: setting up the socket: {error}; dropped");
                continue;
            }
            let _ = stream.set_nodelay(true);
            log::debug!("connection #{index} from {peer} accepted");
            let limit = MAX_PENDING + usize::from(self.session.config().channels) + 1;
            if self.pending.len() >= limit {
                let oldest = self.pending.remove(0);
                self.ignore(&oldest, &format!("still unidentified when {limit} others waited; dropped"));
            }
            let since = Instant::now();
            self.pending.push(Pending { stream, index, peer: Some(peer), since, buf: [0; INIT_PACKET_LEN], have: 0 });
        }
    }

    /// Reads what pending connection `i` has sent and acts on what the session makes of it; true
    /// when the connection left the pending list.
    fn read_pending(&mut self, i: usize) -> Result<bool, Failure> {
        match identify_step(&mut self.pending[i], self.session)? {
            Seen::Waiting => Ok(false),
            Seen::Ignored(reason) => {
                let p = self.pending.remove(i);
                self.ignore(&p, &reason);
                Ok(true)
            }
            Seen::Identified(identity) => {
                let p = self.pending.remove(i);
                self.hand_over(p, identity).map(|()| true)
            }
        }
    }

    /// Gives an identified connection to the receive, ready for blocking reads.
    fn hand_over(&mut self, p: Pending, identity: Identity) -> Result<(), Failure> {
        let place = match identity {
            Identity::Channel(id) => Place::Channel(id),
            _ => Place::Main,
        };
        let setup = |error| Failure::Io { place: place.clone(), doing: "setting up the socket", error };
        p.stream.set_nonblocking(false).map_err(setup)?;
        p.stream.set_read_timeout(Stall::socket_timeout(self.limits.io_timeout)).map_err(setup)?;
        let clone = p.stream.try_clone().map_err(setup)?;
        let watch = clone.as_raw_fd();
        let mut st = lock(&self.hub.state);
        st.sockets.push(clone); // kept open until the hub is dropped, so `watch` stays valid
        match identity {
            Identity::Channel(id) => {
                log::debug!("{} is {id}", p.name());
                self.watched.push((id, watch));
                st.chans[id.index()] = Some(p.stream);
            }
            _ => {
                log::debug!("{} is the main stream", p.name());
                st.main = Some((p.stream, p.buf[..p.have].to_vec()));
            }
        }
        if !st.all && self.session.all_connected() {
            st.all = true;
            self.watched.clear(); // from here on, the workers read the channels
            self.control.set_connected();
            let n = self.session.config().channels;
            log::info!("main stream and {n} channel{} connected", plural(n.into()));
        }
        drop(st);
        self.hub.changed.notify_all();
        Ok(())
    }

    /// Drops the connections that did not identify themselves within the io timeout.
    fn expire(&mut self) {
        let Some(limit) = self.limits.io_timeout else { return };
        if !self.pending.iter().any(|p| p.since.elapsed() >= limit) {
            return;
        }
        let (old, young): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|p| p.since.elapsed() >= limit);
        self.pending = young;
        for p in old {
            let why = format!(
                "sent {} byte{} and nothing that identifies it within {} (--io-timeout); dropped",
                p.have,
                plural(p.have as u64),
                crate::util::secs(limit)
            );
            self.ignore(&p, &why);
        }
    }

    fn ignore(&self, p: &Pending, reason: &str) {
        log::warn!("{}: {reason}", p.name());
        lock(&self.hub.state).ignored += 1;
    }

    fn never_connected(&self) -> Failure {
        let s = self.session;
        let n = s.config().channels;
        Failure::NeverConnected {
            main: !s.main_connected(),
            channels: (0..n).filter(|&c| !s.channel_connected(ChannelId(c))).collect(),
            waited: self.limits.accept_timeout.unwrap_or_default(),
            ignored: lock(&self.hub.state).ignored,
        }
    }
}

/// Reads (without blocking) what connection `p` sent, up to what the session needs to identify it:
/// its first 4 bytes, then for a channel the rest of its init packet.
fn identify_step(p: &mut Pending, session: &Session) -> Result<Seen, Failure> {
    loop {
        let want = if p.have < 4 { 4 } else { INIT_PACKET_LEN };
        let n = match (&p.stream).read(&mut p.buf[p.have..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Seen::Waiting),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Seen::Ignored(format!("{e} before it identified itself; dropped"))),
        };
        if n == 0 {
            return Ok(Seen::Ignored(match p.have {
                0 => "closed before sending anything; ignored".to_owned(),
                h => format!("closed after {h} byte{}, before it could be identified; ignored", plural(h as u64)),
            }));
        }
        p.have += n;
        match session.identify(&p.buf[..p.have]) {
            Ok(Identity::NeedMore { .. }) => continue,
            Ok(known) => return Ok(Seen::Identified(known)),
            // Not a migration's bytes at all: someone else's connection.
            Err(RecvError::Handshake { error: DecodeError::UnknownChannelMagic { found } }) => {
                return Ok(Seen::Ignored(format!(
                    "first bytes {found:#010x} are neither a migration stream's nor a multifd channel's \
                     (a TLS source, or not a migration at all); dropped"
                )));
            }
            Err(error) => return Err(Failure::Connection { index: p.index, error }),
        }
    }
}
