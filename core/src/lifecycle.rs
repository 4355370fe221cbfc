//! Channel worker lifecycle: who may start a worker, who joins it, and when shared state may go.
//!
//! QEMU's multifd shipped two defects that seeded this project: cleanup joined a thread that was never
//! created (a "running" flag was set before a step that could fail, and the thread cleared it under a
//! lock cleanup could destroy), and the received bitmap was freed while channel threads could still
//! write to it. Here both are ruled out by one explicit state machine per channel, held in an atomic
//! and changed only by compare-and-swap along the table below.
//!
//! # States
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Uncreated
//!     Uncreated --> Creating: creator claims the channel
//!     Uncreated --> Abandoned: cleanup seals it, or creator sees the migration quitting
//!     Creating --> Starting: pre-start steps succeeded
//!     Creating --> Failed: a pre-start step failed (error recorded)
//!     Creating --> Abandoned: cleanup seals it, or creator sees the migration quitting
//!     Starting --> Running: Platform::start returned a handle
//!     Starting --> Failed: Platform::start failed (error recorded)
//!     Running --> Joining: cleanup takes the handle
//!     Joining --> Joined: Platform::join returned
//!     Joined --> [*]
//!     Failed --> [*]
//!     Abandoned --> [*]
//! ```
//!
//! | from        | to          | by       | when                                                    |
//! |-------------|-------------|----------|---------------------------------------------------------|
//! | `Uncreated` | `Creating`  | creator  | it begins connect / handshake / init packet             |
//! | `Uncreated` | `Abandoned` | either   | cleanup sealed it, or the creator saw the quit flag     |
//! | `Creating`  | `Starting`  | creator  | every pre-start step succeeded                          |
//! | `Creating`  | `Failed`    | creator  | a pre-start step failed                                 |
//! | `Creating`  | `Abandoned` | either   | cleanup sealed it, or the creator saw the quit flag     |
//! | `Starting`  | `Running`   | creator  | `Platform::start` succeeded; the handle is stored first |
//! | `Starting`  | `Failed`    | creator  | `Platform::start` failed                                |
//! | `Running`   | `Joining`   | cleanup  | it takes the handle                                     |
//! | `Joining`   | `Joined`    | cleanup  | `Platform::join` returned                               |
//!
//! Any other change is refused with [`TransitionError::Illegal`]; a change whose starting state is not
//! the current one is refused with [`TransitionError::Conflict`]. Neither panics.
//!
//! # Invariants
//!
//! 1. **Join iff started, exactly once.** "Started" is the `Running` state, reached only after
//!    [`Platform::start`] returned a handle, and the handle is stored before that state is published.
//!    Cleanup joins by moving `Running -> Joining` with a CAS, so only one caller ever holds a handle.
//!    The worker itself never changes its channel's state: its exit is not observable and nothing is
//!    inferred from it.
//! 2. **A failure before the start** (connect, handshake, init packet, or the start itself) moves the
//!    channel to `Failed`, never joined, and records the error. Other channels' creation then stops:
//!    the migration is quitting, so channels not yet claimed become `Abandoned`.
//! 3. **Cleanup may race creation.** Cleanup seals every channel it finds `Uncreated` or `Creating`
//!    as `Abandoned`; the creator's later CAS to `Starting` then fails, so no worker starts on a sealed
//!    channel. A channel already `Starting` is waited for (a start is short and bounded) and joined if
//!    it started.
//! 4. **Wake before join.** Cleanup first terminates: it sets the quit flag (which every wait in the
//!    core, [`Coordinator::wait_until`], checks) and calls [`Wake::wake`] for every channel, which
//!    is where the embedder shuts its transports down and unparks its workers.
//! 5. **Release after join.** [`Coordinator::cleanup`] returns an [`AllJoined`] token only after every
//!    started worker was joined. Shared state that workers borrow (block tables, bitmaps, buffers)
//!    is released through calls that require this token; the token names its coordinator
//!    ([`CoordinatorId`]), such state is bound to one coordinator when it is made, and a token of
//!    another coordinator is refused with [`ForeignToken`]. On std the shim also runs workers as
//!    scoped threads, so the compiler proves the borrowed state outlives them.
//! 6. **First error wins.** [`Coordinator::record_error`] keeps the first error; later ones are
//!    counted, not lost silently. Recording an error terminates the migration.
//! 7. **One cleanup owner; terminate is idempotent.** A second [`Coordinator::cleanup`] is refused with
//!    [`CleanupError::AlreadyOwned`]; [`Coordinator::terminate`] may run any number of times from any
//!    thread and wakes the workers once.

use core::fmt;

use crate::sync::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering, UnsafeCell, spin_loop};

/// Largest channel count the wire format can carry (the init packet's id is one byte).
pub const MAX_CHANNELS: usize = 255;

/// Index of a channel within one migration, `0..channels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ChannelId(pub u8);

impl ChannelId {
    /// The id as an index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "channel {}", self.0)
    }
}

/// Where a channel's worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum ChannelState {
    /// Nobody has tried to create it yet.
    Uncreated = 0,
    /// The creator is running the pre-start steps (connect, handshake, init packet).
    Creating = 1,
    /// The creator is inside [`Platform::start`].
    Starting = 2,
    /// The worker was started; it must be joined exactly once.
    Running = 3,
    /// Cleanup took the handle and is joining the worker.
    Joining = 4,
    /// The worker was joined. Terminal.
    Joined = 5,
    /// A pre-start step or the start failed; there is no worker. Terminal.
    Failed = 6,
    /// Sealed before a worker started (cleanup began, or the migration was quitting). Terminal.
    Abandoned = 7,
}

impl ChannelState {
    /// Every state, in numeric order.
    pub const ALL: [ChannelState; 8] = [
        Self::Uncreated,
        Self::Creating,
        Self::Starting,
        Self::Running,
        Self::Joining,
        Self::Joined,
        Self::Failed,
        Self::Abandoned,
    ];

    /// The state stored as `raw`. Only values written by this module are ever stored.
    const fn from_raw(raw: u8) -> Self {
        match raw {
            0 => Self::Uncreated,
            1 => Self::Creating,
            2 => Self::Starting,
            3 => Self::Running,
            4 => Self::Joining,
            5 => Self::Joined,
            6 => Self::Failed,
            // Local invariant: the atomic only ever holds a `ChannelState as u8`.
            _ => Self::Abandoned,
        }
    }

    /// No further transition leaves this state.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Joined | Self::Failed | Self::Abandoned)
    }

    /// Whether `self -> to` is in the transition table.
    pub const fn can_become(self, to: ChannelState) -> bool {
        use ChannelState::*;
        matches!(
            (self, to),
            (Uncreated, Creating)
                | (Uncreated, Abandoned)
                | (Creating, Starting)
                | (Creating, Failed)
                | (Creating, Abandoned)
                | (Starting, Running)
                | (Starting, Failed)
                | (Running, Joining)
                | (Joining, Joined)
        )
    }
}

/// A refused state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum TransitionError {
    /// `from -> to` is not in the transition table.
    Illegal {
        /// The channel.
        channel: ChannelId,
        /// State the change would start from.
        from: ChannelState,
        /// State it would reach.
        to: ChannelState,
    },
    /// The channel was not in `expected` (another actor changed it first).
    Conflict {
        /// The channel.
        channel: ChannelId,
        /// State the change expected.
        expected: ChannelState,
        /// State the channel was actually in.
        actual: ChannelState,
        /// State the change would have reached.
        to: ChannelState,
    },
    /// The channel id is not below the migration's channel count.
    NoSuchChannel {
        /// The channel.
        channel: ChannelId,
        /// The migration's channel count.
        channels: u8,
    },
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Illegal { channel, from, to } => {
                write!(f, "{channel}: illegal transition {from:?} -> {to:?}")
            }
            Self::Conflict { channel, expected, actual, to } => {
                write!(f, "{channel}: cannot go {expected:?} -> {to:?}, it is {actual:?}")
            }
            Self::NoSuchChannel { channel, channels } => {
                write!(f, "{channel} does not exist: the migration has {channels} channels")
            }
        }
    }
}

impl core::error::Error for TransitionError {}

/// A coordinator could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConfigError {
    /// `channels` is 0 or above the coordinator's capacity.
    ChannelCount {
        /// Requested channel count.
        channels: u8,
        /// The coordinator's capacity (its `MAX` parameter).
        capacity: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ChannelCount { channels, capacity } => {
                write!(f, "channel count {channels} is outside 1..={capacity}")
            }
        }
    }
}

impl core::error::Error for ConfigError {}

/// Cleanup could not run, or shared state could not yet be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CleanupError {
    /// Another caller already owns cleanup; it runs once.
    AlreadyOwned,
    /// Cleanup has not finished, so a channel may still have a live worker.
    NotQuiescent {
        /// The first channel found not in a terminal state (or the first one, if cleanup never ran).
        channel: ChannelId,
        /// Its state.
        state: ChannelState,
    },
}

impl fmt::Display for CleanupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyOwned => write!(f, "cleanup already ran or is running in another caller"),
            Self::NotQuiescent { channel, state } => {
                write!(f, "{channel} is {state:?}: workers may still run, shared state cannot be released")
            }
        }
    }
}

impl core::error::Error for CleanupError {}

/// A wait inside the core gave up because the migration is terminating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("wait cancelled: the migration is terminating")
    }
}

impl core::error::Error for Cancelled {}

/// How a joined worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WorkerExit {
    /// The worker function returned.
    Returned,
    /// The worker panicked (std only; on bare metal a panic does not come back).
    Panicked,
}

/// How the core wakes a channel's worker and how its waits idle. This is all a worker needs to call
/// back into the coordinator ([`Coordinator::wait_until`], [`Coordinator::record_error`]).
pub trait Wake: Sync {
    /// Unblocks `channel`'s worker wherever it may sleep outside the core: shut its transport down,
    /// unpark it. Called by [`Coordinator::terminate`] for every channel, started or not, and by
    /// cleanup right before each join; it may run more than once, so it must be idempotent, and it
    /// must not block.
    fn wake(&self, channel: ChannelId);

    /// Called in the core's wait loops while `channel` (or cleanup, for a channel being started)
    /// waits. The default spins; a std platform may park briefly.
    fn idle(&self, channel: ChannelId) {
        let _ = channel;
        spin_loop();
    }
}

/// What the embedder provides to run channel workers: OS threads, harts, or cooperative tasks.
///
/// The core holds no OS handles; it stores the opaque [`Platform::Handle`] that `start` returns and
/// hands it back to `join`, exactly once.
pub trait Platform: Wake {
    /// A started worker. [`Platform::join`] consumes it.
    type Handle: Send;
    /// Why a worker could not be started.
    type Error;

    /// Starts the worker for `channel`. `Ok` means the worker exists and will be joined; `Err` means
    /// no worker exists for this channel.
    fn start(&self, channel: ChannelId) -> Result<Self::Handle, Self::Error>;

    /// Waits until the worker has finished. Called exactly once for each handle `start` returned.
    fn join(&self, channel: ChannelId, handle: Self::Handle) -> WorkerExit;
}

impl<W: Wake + ?Sized> Wake for &W {
    fn wake(&self, channel: ChannelId) {
        (**self).wake(channel);
    }

    fn idle(&self, channel: ChannelId) {
        (**self).idle(channel);
    }
}

impl<P: Platform + ?Sized> Platform for &P {
    type Handle = P::Handle;
    type Error = P::Error;

    fn start(&self, channel: ChannelId) -> Result<Self::Handle, Self::Error> {
        (**self).start(channel)
    }

    fn join(&self, channel: ChannelId, handle: Self::Handle) -> WorkerExit {
        (**self).join(channel, handle)
    }
}

/// Fault injection for embedders' tests: wraps a platform and makes its `n`-th start (0-based,
/// counted over the wrapper's life) fail without starting anything.
#[derive(Debug)]
pub struct FailNthStart<P> {
    inner: P,
    fail_at: u32,
    starts: AtomicU32,
}

impl<P> FailNthStart<P> {
    /// Wraps `inner`; start number `fail_at` will fail.
    pub fn new(inner: P, fail_at: u32) -> Self {
        Self { inner, fail_at, starts: AtomicU32::new(0) }
    }
}

/// Error of a [`FailNthStart`] platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StartError<E> {
    /// The start the wrapper was told to fail.
    Injected {
        /// The channel whose start failed.
        channel: ChannelId,
        /// Its start number.
        attempt: u32,
    },
    /// The wrapped platform failed.
    Platform(E),
}

impl<E: fmt::Display> fmt::Display for StartError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Injected { channel, attempt } => write!(f, "{channel}: injected failure of start #{attempt}"),
            Self::Platform(e) => write!(f, "{e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for StartError<E> {}

impl<P: Wake> Wake for FailNthStart<P> {
    fn wake(&self, channel: ChannelId) {
        self.inner.wake(channel);
    }

    fn idle(&self, channel: ChannelId) {
        self.inner.idle(channel);
    }
}

impl<P: Platform> Platform for FailNthStart<P> {
    type Handle = P::Handle;
    type Error = StartError<P::Error>;

    fn start(&self, channel: ChannelId) -> Result<Self::Handle, Self::Error> {
        // Relaxed: a counter; each start takes a distinct number, which is all that is needed.
        let attempt = self.starts.fetch_add(1, Ordering::Relaxed);
        if attempt == self.fail_at {
            return Err(StartError::Injected { channel, attempt });
        }
        self.inner.start(channel).map_err(StartError::Platform)
    }

    fn join(&self, channel: ChannelId, handle: Self::Handle) -> WorkerExit {
        self.inner.join(channel, handle)
    }
}

/// Outcome of one [`Coordinator::create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Created {
    /// The worker was started and will be joined by cleanup.
    Started,
    /// A pre-start step or the start failed; the error was offered to the error slot.
    Failed,
    /// The channel was sealed before a worker started (cleanup began, or the migration was quitting).
    /// Anything `prepare` set up belongs to the caller, which must dispose of it.
    Abandoned,
}

/// Counts from [`Coordinator::create_all`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CreateReport {
    /// Workers started.
    pub started: u8,
    /// Channels whose creation failed.
    pub failed: u8,
    /// Channels sealed before a worker started.
    pub abandoned: u8,
}

/// Counts from [`Coordinator::cleanup`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CleanupReport {
    /// Workers joined (every worker that was started).
    pub joined: u8,
    /// Of those, workers that panicked.
    pub panicked: u8,
    /// Channels cleanup sealed before a worker started.
    pub sealed: u8,
}

/// Which [`Coordinator`] something belongs to: the coordinator's address, from [`Coordinator::id`].
///
/// Two coordinators alive at the same time have different ids. State whose workers belong to one
/// coordinator is bound to its id when it is made (before any worker can reach it), and its release
/// calls refuse an [`AllJoined`] token of any other coordinator with [`ForeignToken`]. Ids come from
/// one program-wide counter, so a coordinator dropped while its workers still ran (possible with a
/// platform whose workers do not borrow it) can never be impersonated by a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CoordinatorId(usize);

impl CoordinatorId {
    /// No coordinator: what unbound state holds. No coordinator has this id, so it matches no token.
    pub(crate) const NONE: CoordinatorId = CoordinatorId(0);
}

impl fmt::Display for CoordinatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coordinator #{}", self.0)
    }
}

/// An [`AllJoined`] token of one coordinator was offered for state bound to another: it proves
/// nothing about the workers that can reach that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ForeignToken {
    /// The coordinator the state is bound to.
    pub bound: CoordinatorId,
    /// The coordinator that made the token.
    pub token: CoordinatorId,
}

impl fmt::Display for ForeignToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the all-joined token is from the {}, but the state is bound to the {}", self.token, self.bound)
    }
}

impl core::error::Error for ForeignToken {}

/// Proof that every worker a [`Coordinator`] started has been joined, so nothing they borrowed is in
/// use any more. Only [`Coordinator::cleanup`] and [`Coordinator::all_joined`] make one. It names its
/// coordinator ([`AllJoined::coordinator`]) and borrows it, so the coordinator cannot move or go
/// while the token lives; release calls check it with [`AllJoined::covers`].
#[derive(Debug)]
pub struct AllJoined<'a> {
    report: CleanupReport,
    coordinator: CoordinatorId,
    _coordinator: core::marker::PhantomData<&'a ()>,
}

impl AllJoined<'_> {
    /// What cleanup did.
    pub fn report(&self) -> CleanupReport {
        self.report
    }

    /// The coordinator whose workers this token proves joined.
    pub fn coordinator(&self) -> CoordinatorId {
        self.coordinator
    }

    /// `Ok` if this token proves the workers of `bound` joined (it is `bound`'s token); otherwise
    /// [`ForeignToken`] naming both coordinators.
    pub fn covers(&self, bound: CoordinatorId) -> Result<(), ForeignToken> {
        if self.coordinator == bound { Ok(()) } else { Err(ForeignToken { bound, token: self.coordinator }) }
    }
}

/// Whether an error offered to [`Coordinator::record_error`] was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Recorded {
    /// It is the migration's error.
    First,
    /// An earlier error was kept; this one was counted in [`Coordinator::later_errors`].
    Later,
}

/// Values of `Coordinator::error_state`.
const ERROR_NONE: u8 = 0;
const ERROR_WRITING: u8 = 1;
const ERROR_SET: u8 = 2;

/// One channel: its state, and the handle of its worker while it runs.
struct Slot<H> {
    state: AtomicU8,
    /// Written only by the creator while the state is `Starting`; taken only by cleanup after it moved
    /// the state `Running -> Joining`. The state machine makes these two accesses exclusive.
    handle: UnsafeCell<Option<H>>,
}

impl<H> Slot<H> {
    #[cfg(not(all(test, loom)))]
    const fn new() -> Self {
        Self { state: AtomicU8::new(ChannelState::Uncreated as u8), handle: UnsafeCell::new(None) }
    }

    #[cfg(all(test, loom))]
    fn new() -> Self {
        Self { state: AtomicU8::new(ChannelState::Uncreated as u8), handle: UnsafeCell::new(None) }
    }

    fn load(&self) -> ChannelState {
        // Acquire: a caller acting on the state it saw (e.g. cleanup seeing `Running`) also sees what
        // the transition into it published (the stored handle).
        ChannelState::from_raw(self.state.load(Ordering::Acquire))
    }
}

/// The lifecycle of up to `MAX` channel workers of one migration (one direction).
///
/// `H` is the embedder's worker handle ([`Platform::Handle`]); `E` is the migration's error type.
/// Outside loom, `new` is `const`, so a coordinator can live in a `static` on bare metal.
pub struct Coordinator<H, E, const MAX: usize> {
    channels: u8,
    slots: [Slot<H>; MAX],
    /// Set by the first `terminate`; read by every wait in the core and by the creator.
    quit: AtomicBool,
    /// Taken by the one cleanup owner.
    cleanup_owner: AtomicBool,
    /// Set once cleanup has joined every started worker.
    cleanup_done: AtomicBool,
    /// This coordinator's [`CoordinatorId`], taken from [`crate::sync::next_unique_id`] on first use
    /// (0 until then), so no two coordinators of one program ever share one.
    id: AtomicUsize,
    /// `ERROR_NONE -> ERROR_WRITING -> ERROR_SET`; guards `error`.
    error_state: AtomicU8,
    error: UnsafeCell<Option<E>>,
    /// Errors offered after the first one.
    later_errors: AtomicU32,
    #[cfg(test)]
    bug: InjectedBug,
}

/// Deliberate defects, compiled only into tests, that reproduce QEMU's seed defects so the loom
/// models can show they would be caught.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InjectedBug {
    None,
    /// Seed defect 1: publish the channel as running before the fallible pre-start step.
    MarkRunningBeforePrepare,
    /// Seed defect 2: hand out the "all joined" token as soon as cleanup begins.
    TokenBeforeJoin,
}

// SAFETY: the `UnsafeCell`s are reached only under the protocols documented on the fields: a handle is
// written by the one creator in `Starting` and taken by the one cleanup after its `Running -> Joining`
// CAS (the handle moves between threads, hence `H: Send`); the error is written once by the caller that
// won `ERROR_NONE -> ERROR_WRITING` and only read (shared, by any thread: `E: Sync`) after `ERROR_SET`
// is published, or moved out through `&mut self` (`E: Send`).
unsafe impl<H: Send, E: Send + Sync, const MAX: usize> Sync for Coordinator<H, E, MAX> {}

impl<H, E, const MAX: usize> fmt::Debug for Coordinator<H, E, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for slot in &self.slots[..self.channels as usize] {
            list.entry(&slot.load());
        }
        list.finish()
    }
}

impl<H, E, const MAX: usize> Coordinator<H, E, MAX> {
    /// A coordinator for `channels` channels, all `Uncreated`.
    #[cfg(not(all(test, loom)))]
    pub const fn new(channels: u8) -> Result<Self, ConfigError> {
        const { assert!(MAX >= 1 && MAX <= MAX_CHANNELS, "capacity must be 1..=255 channels") };
        if channels == 0 || channels as usize > MAX {
            return Err(ConfigError::ChannelCount { channels, capacity: MAX });
        }
        Ok(Self {
            channels,
            slots: [const { Slot::new() }; MAX],
            quit: AtomicBool::new(false),
            cleanup_owner: AtomicBool::new(false),
            cleanup_done: AtomicBool::new(false),
            id: AtomicUsize::new(0),
            error_state: AtomicU8::new(ERROR_NONE),
            error: UnsafeCell::new(None),
            later_errors: AtomicU32::new(0),
            #[cfg(test)]
            bug: InjectedBug::None,
        })
    }

    /// A coordinator for `channels` channels, all `Uncreated` (loom build: not `const`).
    #[cfg(all(test, loom))]
    pub fn new(channels: u8) -> Result<Self, ConfigError> {
        const { assert!(MAX >= 1 && MAX <= MAX_CHANNELS, "capacity must be 1..=255 channels") };
        if channels == 0 || channels as usize > MAX {
            return Err(ConfigError::ChannelCount { channels, capacity: MAX });
        }
        Ok(Self {
            channels,
            slots: core::array::from_fn(|_| Slot::new()),
            quit: AtomicBool::new(false),
            cleanup_owner: AtomicBool::new(false),
            cleanup_done: AtomicBool::new(false),
            id: AtomicUsize::new(0),
            error_state: AtomicU8::new(ERROR_NONE),
            error: UnsafeCell::new(None),
            later_errors: AtomicU32::new(0),
            bug: InjectedBug::None,
        })
    }

    #[cfg(test)]
    pub(crate) fn with_bug(mut self, bug: InjectedBug) -> Self {
        self.bug = bug;
        self
    }

    /// This coordinator's identity, which its [`AllJoined`] tokens carry: unique among every
    /// coordinator the program ever creates (it is not an address, so it survives a move and is never
    /// reused after a drop).
    pub fn id(&self) -> CoordinatorId {
        // Acquire/AcqRel: a reader of the id sees the one value the first caller installed.
        let id = self.id.load(Ordering::Acquire);
        if id != 0 {
            return CoordinatorId(id);
        }
        let fresh = crate::sync::next_unique_id();
        match self.id.compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => CoordinatorId(fresh),
            Err(installed) => CoordinatorId(installed),
        }
    }

    /// Number of channels in this migration.
    pub const fn channels(&self) -> u8 {
        self.channels
    }

    /// Ids of this migration's channels.
    pub fn ids(&self) -> impl Iterator<Item = ChannelId> + use<H, E, MAX> {
        (0..self.channels).map(ChannelId)
    }

    fn slot(&self, channel: ChannelId) -> Result<&Slot<H>, TransitionError> {
        if channel.0 < self.channels {
            Ok(&self.slots[channel.index()])
        } else {
            Err(TransitionError::NoSuchChannel { channel, channels: self.channels })
        }
    }

    /// The current state of `channel`.
    pub fn state(&self, channel: ChannelId) -> Result<ChannelState, TransitionError> {
        self.slot(channel).map(Slot::load)
    }

    /// Moves `channel` from `from` to `to` if that is in the table and the channel is in `from`.
    fn transition(&self, channel: ChannelId, from: ChannelState, to: ChannelState) -> Result<(), TransitionError> {
        let slot = self.slot(channel)?;
        if !from.can_become(to) {
            return Err(TransitionError::Illegal { channel, from, to });
        }
        // AcqRel on success: Release publishes what this actor did before the change (the stored
        // handle before `Running`), Acquire takes what the previous change published. Acquire on
        // failure: the state read is reported and acted on.
        match slot.state.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                debug!("multifd channel {}: {:?} -> {:?}", channel.0, from, to);
                Ok(())
            }
            Err(actual) => {
                Err(TransitionError::Conflict { channel, expected: from, actual: ChannelState::from_raw(actual), to })
            }
        }
    }

    /// Whether the migration is terminating (an error was recorded, or `terminate`/`cleanup` ran).
    pub fn is_quitting(&self) -> bool {
        // Acquire: a worker that sees the flag also sees the error recorded before it was set.
        self.quit.load(Ordering::Acquire)
    }

    /// Creates one channel: claims it, runs `prepare` (connect, handshake, init packet: the fallible
    /// steps before a worker exists), then starts its worker through `platform`.
    ///
    /// A failure of `prepare` or of the start leaves the channel `Failed` (never joined) and records
    /// the error. If the migration is quitting, or cleanup sealed the channel, no worker starts and
    /// the result is [`Created::Abandoned`]. `Err` only for a channel id out of range or a channel
    /// already claimed by another creator.
    pub fn create<P>(
        &self,
        platform: &P,
        channel: ChannelId,
        prepare: impl FnOnce(ChannelId) -> Result<(), E>,
    ) -> Result<Created, TransitionError>
    where
        P: Platform<Handle = H> + ?Sized,
        E: From<P::Error>,
    {
        use ChannelState::*;
        if self.is_quitting() {
            return self.abandon_from(channel, Uncreated);
        }
        match self.transition(channel, Uncreated, Creating) {
            Ok(()) => {}
            // Cleanup sealed the channel after the quit check above: nothing to create.
            Err(TransitionError::Conflict { actual: Abandoned, .. }) => return Ok(Created::Abandoned),
            Err(other) => return Err(other),
        }
        #[cfg(test)]
        if self.bug == InjectedBug::MarkRunningBeforePrepare {
            return self.create_with_seed_defect_1(platform, channel, prepare);
        }

        if let Err(err) = prepare(channel) {
            warn!("multifd channel {}: creation failed before its worker started", channel.0);
            let failed = self.transition(channel, Creating, Failed);
            self.record_error(platform, err);
            return match failed {
                Ok(()) => Ok(Created::Failed),
                // Cleanup sealed it while `prepare` ran: the channel is `Abandoned`, equally never joined.
                Err(TransitionError::Conflict { actual: Abandoned, .. }) => Ok(Created::Abandoned),
                Err(other) => Err(other),
            };
        }
        if self.is_quitting() {
            return self.abandon_from(channel, Creating);
        }
        match self.transition(channel, Creating, Starting) {
            Ok(()) => {}
            Err(TransitionError::Conflict { actual: Abandoned, .. }) => return Ok(Created::Abandoned),
            Err(other) => return Err(other),
        }

        // From here only this creator acts on the channel; cleanup waits for `Starting` to resolve.
        match platform.start(channel) {
            Ok(handle) => {
                let slot = self.slot(channel)?;
                // SAFETY: in `Starting` only the creator (this thread) touches the handle cell: cleanup
                // takes it only after its own `Running -> Joining` CAS, which cannot happen before the
                // `Starting -> Running` transition below publishes this write.
                slot.handle.with_mut(|h| unsafe { *h = Some(handle) });
                self.transition(channel, Starting, Running)?;
                Ok(Created::Started)
            }
            Err(err) => {
                warn!("multifd channel {}: the platform could not start its worker", channel.0);
                self.transition(channel, Starting, Failed)?;
                self.record_error(platform, E::from(err));
                Ok(Created::Failed)
            }
        }
    }

    /// QEMU's seed defect 1, reproduced for the loom models: the channel is published as running
    /// before the fallible step, and stays so when that step fails.
    #[cfg(test)]
    fn create_with_seed_defect_1<P>(
        &self,
        platform: &P,
        channel: ChannelId,
        prepare: impl FnOnce(ChannelId) -> Result<(), E>,
    ) -> Result<Created, TransitionError>
    where
        P: Platform<Handle = H> + ?Sized,
        E: From<P::Error>,
    {
        let slot = self.slot(channel)?;
        // Release: as any publication of a state.
        slot.state.store(ChannelState::Running as u8, Ordering::Release);
        if let Err(err) = prepare(channel) {
            self.record_error(platform, err);
            return Ok(Created::Failed);
        }
        let handle = platform.start(channel).map_err(|_| TransitionError::Illegal {
            channel,
            from: ChannelState::Running,
            to: ChannelState::Failed,
        })?;
        // SAFETY: deliberately unsound protocol (the defect under test); loom reports the race.
        slot.handle.with_mut(|h| unsafe { *h = Some(handle) });
        Ok(Created::Started)
    }

    /// Seals `channel` from `from` because the migration is quitting.
    fn abandon_from(&self, channel: ChannelId, from: ChannelState) -> Result<Created, TransitionError> {
        match self.transition(channel, from, ChannelState::Abandoned) {
            Ok(()) | Err(TransitionError::Conflict { actual: ChannelState::Abandoned, .. }) => Ok(Created::Abandoned),
            Err(other) => Err(other),
        }
    }

    /// Creates every channel in order with [`Coordinator::create`]. After the first failure the
    /// migration is quitting, so the remaining channels are sealed as abandoned rather than created.
    pub fn create_all<P>(
        &self,
        platform: &P,
        mut prepare: impl FnMut(ChannelId) -> Result<(), E>,
    ) -> Result<CreateReport, TransitionError>
    where
        P: Platform<Handle = H> + ?Sized,
        E: From<P::Error>,
    {
        let mut report = CreateReport::default();
        for channel in self.ids() {
            match self.create(platform, channel, &mut prepare)? {
                Created::Started => report.started += 1,
                Created::Failed => report.failed += 1,
                Created::Abandoned => report.abandoned += 1,
            }
        }
        Ok(report)
    }

    /// Offers `err` as the migration's error: the first one is kept, later ones are counted. Either
    /// way the migration terminates (see [`Coordinator::terminate`]).
    pub fn record_error<W: Wake + ?Sized>(&self, waker: &W, err: E) -> Recorded {
        // Acquire on success: nothing to take, but keeps the pair symmetric with the Release below.
        // Relaxed on failure: the loser only counts itself.
        let recorded =
            match self.error_state.compare_exchange(ERROR_NONE, ERROR_WRITING, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => {
                    // SAFETY: winning `ERROR_NONE -> ERROR_WRITING` makes this the only writer ever, and no
                    // reader looks at the cell before `ERROR_SET` is published below.
                    self.error.with_mut(|e| unsafe { *e = Some(err) });
                    // Release: publishes the error to readers that Acquire-load `ERROR_SET`.
                    self.error_state.store(ERROR_SET, Ordering::Release);
                    Recorded::First
                }
                Err(_) => {
                    // Relaxed: a statistic, read after the workers are joined.
                    self.later_errors.fetch_add(1, Ordering::Relaxed);
                    Recorded::Later
                }
            };
        self.terminate(waker);
        recorded
    }

    /// The migration's error, once one was recorded.
    pub fn error(&self) -> Option<&E> {
        // Acquire: pairs with the Release store of `ERROR_SET`, making the written error visible.
        if self.error_state.load(Ordering::Acquire) != ERROR_SET {
            return None;
        }
        // SAFETY: after `ERROR_SET` the cell is never written again (only `take_error`, which needs
        // `&mut self`, moves it out), so shared references to it are sound.
        self.error.with(|e| unsafe { (*e).as_ref() })
    }

    /// Moves the migration's error out.
    pub fn take_error(&mut self) -> Option<E> {
        // Acquire: as in `error`.
        if self.error_state.load(Ordering::Acquire) != ERROR_SET {
            return None;
        }
        // SAFETY: `&mut self` excludes every other access to the cell.
        self.error.with_mut(|e| unsafe { (*e).take() })
    }

    /// How many errors were offered after the first one.
    pub fn later_errors(&self) -> u32 {
        // Relaxed: a statistic; callers read it after the workers are joined.
        self.later_errors.load(Ordering::Relaxed)
    }

    /// Asks every worker to stop: sets the quit flag, then wakes every channel through
    /// [`Wake::wake`]. Idempotent; returns `true` only for the call that set the flag.
    pub fn terminate<W: Wake + ?Sized>(&self, waker: &W) -> bool {
        // AcqRel: Release publishes the error recorded before terminating to whoever sees the flag;
        // Acquire orders this call after an earlier terminate's writes.
        let first = !self.quit.swap(true, Ordering::AcqRel);
        if first {
            debug!("multifd: terminating {} channels", self.channels);
            for channel in self.ids() {
                waker.wake(channel);
            }
        }
        first
    }

    /// Waits, through [`Wake::idle`], until `ready()` is true; gives up with [`Cancelled`] as soon
    /// as the migration is terminating. Every wait a worker makes inside the core goes through here,
    /// so terminate always ends it.
    pub fn wait_until<W: Wake + ?Sized>(
        &self,
        waker: &W,
        channel: ChannelId,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), Cancelled> {
        loop {
            if self.is_quitting() {
                return Err(Cancelled);
            }
            if ready() {
                return Ok(());
            }
            waker.idle(channel);
        }
    }

    /// Ends the migration's workers: terminates (quit flag, wake every channel), seals every channel
    /// that has no worker yet, and joins every worker that was started, exactly once. Returns the
    /// [`AllJoined`] token that shared-state release calls require. Runs once: a second call, from
    /// any thread, gets [`CleanupError::AlreadyOwned`].
    pub fn cleanup<P>(&self, platform: &P) -> Result<AllJoined<'_>, CleanupError>
    where
        P: Platform<Handle = H> + ?Sized,
    {
        // Acquire: orders this owner after everything that happened before the flag was free (nothing
        // to take in practice). Relaxed on failure: the loser returns at once.
        if self.cleanup_owner.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(CleanupError::AlreadyOwned);
        }
        self.terminate(platform);
        let mut report = CleanupReport::default();
        for channel in self.ids() {
            self.finish_channel(platform, channel, &mut report);
        }
        // Release: publishes the joins (and the workers' writes they acquired) to `all_joined` callers.
        self.cleanup_done.store(true, Ordering::Release);
        debug!(
            "multifd: cleanup joined {} workers ({} panicked), sealed {}",
            report.joined, report.panicked, report.sealed
        );
        Ok(AllJoined { report, coordinator: self.id(), _coordinator: core::marker::PhantomData })
    }

    /// Cleanup of one channel: seal it if no worker can exist yet, wait out a start in progress, join
    /// a started worker.
    fn finish_channel<P>(&self, platform: &P, channel: ChannelId, report: &mut CleanupReport)
    where
        P: Platform<Handle = H> + ?Sized,
    {
        use ChannelState::*;
        loop {
            let state = match self.state(channel) {
                Ok(state) => state,
                // Local invariant: `ids()` yields only ids below the channel count.
                Err(_) => return,
            };
            let from = match state {
                Uncreated | Creating => state,
                Starting => {
                    // The creator is inside `Platform::start`, which is short; it ends in `Running`
                    // or `Failed`.
                    platform.idle(channel);
                    continue;
                }
                Running => {
                    if self.transition(channel, Running, Joining).is_err() {
                        continue;
                    }
                    let slot = &self.slots[channel.index()];
                    // SAFETY: the `Running -> Joining` CAS above succeeded in this, the only cleanup
                    // owner; it acquired the creator's handle write, and nobody else touches the cell
                    // from `Joining` on.
                    let handle = slot.handle.with_mut(|h| unsafe { (*h).take() });
                    let Some(handle) = handle else {
                        // Unreachable by construction: `Running` is published only after the handle is
                        // stored. Reaching it means the state machine was bypassed (the seed defect
                        // the tests inject); joining nothing would be the C bug, so stop loudly.
                        panic!("multifd {}: Running without a worker handle: it was never started", channel);
                    };
                    platform.wake(channel);
                    if platform.join(channel, handle) == WorkerExit::Panicked {
                        report.panicked += 1;
                    }
                    report.joined += 1;
                    // Local invariant: only the cleanup owner moves a channel out of `Joining`.
                    let _ = self.transition(channel, Joining, Joined);
                    return;
                }
                Joining | Joined | Failed | Abandoned => return,
            };
            if self.transition(channel, from, Abandoned).is_ok() {
                report.sealed += 1;
                return;
            }
            // The creator moved the channel on meanwhile; look again.
        }
    }

    /// The [`AllJoined`] token, if cleanup has finished; otherwise the first channel that may still
    /// have a live worker. Release calls for shared state use this on static arenas.
    pub fn all_joined(&self) -> Result<AllJoined<'_>, CleanupError> {
        // Acquire: pairs with cleanup's Release store, so the joins happen-before the caller's release.
        let done = self.cleanup_done.load(Ordering::Acquire);
        // Seed defect 2, reproduced for the loom models: shared state released once cleanup has
        // begun, while it may still be joining workers that use it.
        #[cfg(test)]
        let done = done || (self.bug == InjectedBug::TokenBeforeJoin && self.cleanup_owner.load(Ordering::Acquire));
        if !done {
            let channel = self.ids().find(|&c| self.state(c).is_ok_and(|s| !s.is_terminal())).unwrap_or(ChannelId(0));
            let state = self.state(channel).unwrap_or(ChannelState::Uncreated);
            return Err(CleanupError::NotQuiescent { channel, state });
        }
        let mut report = CleanupReport::default();
        for channel in self.ids() {
            match self.state(channel) {
                Ok(ChannelState::Joined) => report.joined += 1,
                Ok(ChannelState::Abandoned) => report.sealed += 1,
                _ => {}
            }
        }
        Ok(AllJoined { report, coordinator: self.id(), _coordinator: core::marker::PhantomData })
    }
}

#[cfg(test)]
mod tests;

#[cfg(all(test, not(loom)))]
mod regress_tests;

/// Test helpers shared by the core's modules.
#[cfg(test)]
pub(crate) mod testing {
    use super::{ChannelId, Platform, Wake, WorkerExit};
    use core::convert::Infallible;

    /// A platform that runs nothing: a started worker is a unit handle, and joining it returns at
    /// once. Enough to drive a coordinator's states when the test plays the workers itself.
    pub(crate) struct Inline;

    impl Wake for Inline {
        fn wake(&self, _: ChannelId) {}
    }

    impl Platform for Inline {
        type Handle = ();
        type Error = Infallible;
        fn start(&self, _: ChannelId) -> Result<(), Infallible> {
            Ok(())
        }
        fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
            WorkerExit::Returned
        }
    }
}
