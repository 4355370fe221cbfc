//! Listening, accepting and identifying the connections of an incoming migration. The session
//! decides what each connection is; this waits for them (the accept timeout) and reads their first
//! bytes (the io timeout).

use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use multifd_core::lifecycle::ChannelId;
use multifd_core::recv::{Identity, RecvError};
use multifd_core::wire::packet::INIT_PACKET_LEN;

use super::{Conns, Failure, Limits, Options, Place, Report, Session, io_failure, output};
use crate::util::{Stall, peer_closed, read_retry, timed_out};

pub(super) fn listen(opts: &Options, report: &mut Report) -> Result<TcpListener, Failure> {
    let io = |doing| move |error| Failure::Io { place: Place::Listener, doing, error };
    let listener = TcpListener::bind(&opts.listen).map_err(io("binding"))?;
    let bound = listener.local_addr().map_err(io("local_addr"))?;
    report.bound = Some(bound);
    eprintln!("multifd recv: listening on {bound} for {} channels", opts.channels);
    if let Some(pf) = &opts.port_file {
        let tmp = pf.with_extension("tmp");
        fs::write(&tmp, format!("{}\n", bound.port()))
            .and_then(|()| fs::rename(&tmp, pf))
            .map_err(|error| Failure::Io { place: output(pf), doing: "writing the port file", error })?;
    }
    listener.set_nonblocking(true).map_err(io("making the listener non-blocking"))?;
    Ok(listener)
}

/// Waits until `listener` has a connection to accept, or until `deadline`; false when it passed.
fn wait_acceptable(listener: &TcpListener, deadline: Option<Instant>) -> Result<bool, Failure> {
    loop {
        let timeout_ms = match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
            None => -1,
            Some(left) if left.is_zero() => return Ok(false),
            Some(left) => i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX),
        };
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid `pollfd` for the listener's open descriptor; the count says 1.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r > 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        if r < 0 && error.kind() != io::ErrorKind::Interrupted {
            return Err(Failure::Io { place: Place::Listener, doing: "waiting for connections", error });
        }
    }
}

/// Accepts connections until the session has the main stream and every channel. Once the first is
/// in, the others must arrive within the accept timeout; each must identify itself within the io
/// timeout.
pub(super) fn accept_all(listener: &TcpListener, session: &Session, limits: &Limits) -> Result<Conns, Failure> {
    let n = usize::from(session.config().channels);
    let (mut main, mut chans): (Option<TcpStream>, Vec<Option<TcpStream>>) = (None, (0..n).map(|_| None).collect());
    let (mut accepted, mut deadline) = (0usize, None);
    while !session.all_connected() {
        if !wait_acceptable(listener, deadline)? {
            return Err(Failure::NeverConnected {
                main: !session.main_connected(),
                channels: (0..n as u8).filter(|&c| !session.channel_connected(ChannelId(c))).collect(),
                waited: limits.accept_timeout.unwrap_or_default(),
            });
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(error) => return Err(Failure::Io { place: Place::Listener, doing: "accepting", error }),
        };
        let index = accepted;
        accepted += 1;
        deadline = deadline.or_else(|| limits.accept_timeout.map(|t| Instant::now() + t));
        match identify(&stream, index, session, limits)? {
            Identity::Main => main = Some(stream),
            Identity::Channel(id) => chans[id.index()] = Some(stream),
            // `identify` reads until the session decides; never left undecided.
            Identity::NeedMore { .. } => {
                return Err(Failure::Connection { index, error: session.closed_unidentified(0) });
            }
        }
    }
    match (main, chans.into_iter().collect::<Option<Vec<_>>>()) {
        (Some(main), Some(chans)) => Ok(Conns { main, chans }),
        // Local invariant: the session says every role is connected only once each was identified here.
        _ => Err(Failure::Recv(RecvError::MainNotEnded)),
    }
}

/// Reads a connection's first bytes until the session knows what it is: 4 bytes are peeked (a main
/// stream keeps them for its parser), a channel's init packet is read.
fn identify(stream: &TcpStream, index: usize, session: &Session, limits: &Limits) -> Result<Identity, Failure> {
    let place = Place::Connection(index);
    let setup = |error| Failure::Io { place: place.clone(), doing: "setting up the socket", error };
    stream.set_nonblocking(false).map_err(setup)?;
    stream.set_read_timeout(Stall::socket_timeout(limits.io_timeout)).map_err(setup)?;
    let _ = stream.set_nodelay(true);
    let refused = |error| Failure::Connection { index, error };
    let first = peek_first(stream, &place, limits.io_timeout)?;
    let Ok(first) = <[u8; 4]>::try_from(first.as_slice()) else {
        return Err(refused(session.closed_unidentified(first.len())));
    };
    match session.identify(&first).map_err(refused)? {
        Identity::NeedMore { need } if need == INIT_PACKET_LEN => {
            let mut init = [0u8; INIT_PACKET_LEN];
            // Nothing else is read yet: the counter stays still, so the io timeout counts from here.
            let still = AtomicU64::new(0);
            let stall = Stall { total: &still, limit: limits.io_timeout };
            let mut have = 0;
            while have < INIT_PACKET_LEN {
                match read_retry(stream, &mut init[have..], stall) {
                    Ok(0) => return Err(refused(session.closed_unidentified(have))),
                    Ok(n) => have += n,
                    Err(error) => return Err(io_failure(place, "reading the init packet", error, limits.io_timeout)),
                }
            }
            session.identify(&init).map_err(refused)
        }
        // Four bytes always decide between the main stream and a channel.
        Identity::NeedMore { .. } => Err(refused(session.closed_unidentified(first.len()))),
        known => Ok(known),
    }
}

/// Peeks at most 4 bytes: returns them once 4 are there or the peer closed its side; fails after the
/// io timeout without them.
fn peek_first(stream: &TcpStream, place: &Place, io_timeout: Option<Duration>) -> Result<Vec<u8>, Failure> {
    let mut first = [0u8; 4];
    let start = Instant::now();
    let stalled = || {
        let over = io_timeout.filter(|&waited| start.elapsed() >= waited);
        over.map(|waited| Failure::Stalled { place: place.clone(), doing: "identifying the connection", waited })
    };
    loop {
        let got = match stream.peek(&mut first) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if timed_out(&e) => match stalled() {
                Some(f) => return Err(f),
                None => continue,
            },
            Err(error) => {
                return Err(Failure::Io { place: place.clone(), doing: "identifying the connection", error });
            }
        };
        // A few bytes and then the peer's FIN: `peek` keeps returning those bytes without ever
        // reporting the end, so ask TCP whether the peer has closed its side.
        if got == 0 || got == 4 || peer_closed(stream) {
            return Ok(first[..got].to_vec());
        }
        if let Some(f) = stalled() {
            return Err(f);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
