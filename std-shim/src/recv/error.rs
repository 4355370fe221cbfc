//! Why `multifd recv` failed, and where.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use multifd_core::lifecycle::ChannelId;
use multifd_core::recv::{BlockListError, RecvError};

use crate::platform::StartError;
use crate::util::secs;

/// Where a failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The listening socket.
    Listener,
    /// An accepted connection not yet identified (0-based accept order).
    Connection(usize),
    /// The main stream.
    Main,
    /// A multifd channel.
    Channel(ChannelId),
    /// A RAM block (by its idstr).
    Block(String),
    /// The output directory or a block file.
    Output(PathBuf),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Listener => write!(f, "listener"),
            Place::Connection(n) => write!(f, "connection #{n}"),
            Place::Main => write!(f, "main stream"),
            Place::Channel(c) => write!(f, "{c}"),
            Place::Block(b) => write!(f, "block {b:?}"),
            Place::Output(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why a `--prealloc` block does not fit the source's block list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreallocError {
    /// The source declares the block with another size.
    Size {
        /// Bytes given to `--prealloc`.
        given: u64,
        /// Bytes the source declares.
        declared: u64,
    },
    /// The source does not declare the block.
    NotDeclared,
    /// The size does not fit this machine's address space.
    TooLarge,
}

/// Why `multifd recv` failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// An I/O error.
    Io {
        /// Where.
        place: Place,
        /// What was being done.
        doing: &'static str,
        /// The error.
        error: io::Error,
    },
    /// The session refused a connection before it was identified (first bytes, init packet).
    Connection {
        /// The connection (0-based accept order).
        index: usize,
        /// Why.
        error: RecvError,
    },
    /// The session refused the peer's input or a completion check failed (the error names the
    /// channel, main stream or block).
    Recv(RecvError),
    /// A `--prealloc` block does not match the block list.
    Prealloc {
        /// The block.
        block: String,
        /// How.
        error: PreallocError,
    },
    /// An option is out of range.
    Option {
        /// The option.
        option: &'static str,
        /// The value given.
        value: u64,
    },
    /// Connections still missing when the accept timeout ran out.
    NeverConnected {
        /// Whether the main stream is among them.
        main: bool,
        /// The ids of the channels that never connected.
        channels: Vec<u8>,
        /// The accept timeout.
        waited: Duration,
        /// Connections dropped meanwhile without being identified (each was logged).
        ignored: usize,
    },
    /// The main stream or a channel closed while other connections were still missing: the source
    /// gave up.
    SourceGone {
        /// The main stream or the channel.
        place: Place,
        /// Connections dropped meanwhile without being identified (each was logged): often what
        /// made the source give up.
        ignored: usize,
    },
    /// A signal (or [`Control::stop`](super::Control::stop)) stopped the receive; nothing was kept.
    Interrupted {
        /// The signal's number; `None` when stopped through the API.
        signal: Option<i32>,
    },
    /// No byte arrived on any connection for the io timeout while this one was read.
    Stalled {
        /// The connection whose read gave up.
        place: Place,
        /// What was being read.
        doing: &'static str,
        /// The io timeout.
        waited: Duration,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io { place, doing, error } => write!(f, "{place}: {doing}: {error}"),
            Failure::Connection { index, error } => write!(f, "{}: {error}", Place::Connection(*index)),
            Failure::Recv(e @ RecvError::BlockList(BlockListError::TooMuchRam { .. })) => write!(f, "{e} (--max-ram)"),
            Failure::Recv(e) => write!(f, "{e}"),
            Failure::Prealloc { block, error: PreallocError::Size { given, declared } } => {
                write!(f, "block {block:?}: --prealloc size {given} but the source declares {declared} bytes")
            }
            Failure::Prealloc { block, error: PreallocError::NotDeclared } => {
                write!(f, "block {block:?}: given to --prealloc but not in the source's block list")
            }
            Failure::Prealloc { block, error: PreallocError::TooLarge } => {
                write!(f, "block {block:?}: --prealloc size does not fit this machine")
            }
            Failure::Option { option, value } => write!(f, "{option} {value} is out of range"),
            Failure::NeverConnected { main, channels, waited, ignored } => {
                let mut missing: Vec<String> = Vec::new();
                if *main {
                    missing.push("main stream".into());
                }
                missing.extend(channels.iter().map(|c| format!("channel {c}")));
                let (who, waited) = (missing.join(", "), secs(*waited));
                write!(
                    f,
                    "{who} never connected: still missing {waited} after the first connection (--accept-timeout)"
                )?;
                dropped(f, *ignored)
            }
            Failure::SourceGone { place, ignored } => {
                let why = "closed by the source before every connection was in (it gave up; its own log says why)";
                write!(f, "{place}: {why}")?;
                dropped(f, *ignored)
            }
            Failure::Interrupted { signal: Some(s) } => {
                write!(f, "interrupted by {}; nothing was kept", signal_name(*s))
            }
            Failure::Interrupted { signal: None } => write!(f, "stopped; nothing was kept"),
            Failure::Stalled { place, doing, waited } => write!(
                f,
                "{place}: stalled: no data arrived on any connection for {} while {doing} (--io-timeout)",
                secs(*waited)
            ),
        }
    }
}

impl std::error::Error for Failure {}

/// Appends how many connections were dropped unidentified, if any.
fn dropped(f: &mut fmt::Formatter<'_>, ignored: usize) -> fmt::Result {
    match ignored {
        0 => Ok(()),
        1 => write!(f, "; 1 other connection was dropped unidentified (see the log)"),
        n => write!(f, "; {n} other connections were dropped unidentified (see the log)"),
    }
}

/// `SIGINT`, `SIGTERM`, or `signal N`.
pub(crate) fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        Failure::Io { place: Place::Channel(e.channel), doing: "starting its worker thread", error: e.error }
    }
}

impl From<RecvError> for Failure {
    fn from(e: RecvError) -> Self {
        Failure::Recv(e)
    }
}
