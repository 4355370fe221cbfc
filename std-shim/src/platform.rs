//! Channel workers as named OS threads, scoped so that the state they borrow provably outlives them.
//!
//! [`run_scoped`] opens a [`std::thread::scope`] and hands the body a [`ScopedPlatform`], the
//! [`Platform`] implementation the core's [`Coordinator`](multifd_core::lifecycle::Coordinator) uses to
//! start (`multifd-send-N` / `multifd-recv-N` threads), wake (unpark, plus an optional transport
//! shutdown hook) and join its workers. Because the threads are scoped, everything declared outside
//! `run_scoped` (the coordinator, RAM blocks, bitmaps) is borrowed for the whole life of every worker:
//! the compiler refuses code that could free it earlier. Any worker the body left unjoined is joined
//! when the scope ends.

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::thread::{self, Scope, ScopedJoinHandle, Thread};
use std::time::Duration;

use multifd_core::lifecycle::{ChannelId, MAX_CHANNELS, Platform, Wake, WorkerExit};

/// Which side of a migration the workers serve; it names their threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Source side: threads `multifd-send-N`.
    Send,
    /// Destination side: threads `multifd-recv-N`.
    Recv,
}

impl Role {
    fn thread_name(self, channel: ChannelId) -> String {
        match self {
            Role::Send => format!("multifd-send-{}", channel.0),
            Role::Recv => format!("multifd-recv-{}", channel.0),
        }
    }
}

/// How long an idle wait parks before looking at its condition again, should a wake-up be missed.
const IDLE_PARK: Duration = Duration::from_millis(1);

/// A hook called whenever the core wakes a channel: where the embedder shuts its transport down.
pub type WakeHook<'h> = Box<dyn Fn(ChannelId) + Send + Sync + 'h>;

/// Wakes std channel workers: unparks their threads and calls the embedder's hook. Workers get a
/// reference to it, to pass to the coordinator's `wait_until` and `record_error`.
pub struct StdWaker<'h> {
    /// Each started worker's thread, for unparking it.
    threads: Mutex<Vec<Option<Thread>>>,
    hook: Option<WakeHook<'h>>,
}

impl fmt::Debug for StdWaker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StdWaker").field("hook", &self.hook.is_some()).finish_non_exhaustive()
    }
}

impl StdWaker<'_> {
    fn register(&self, channel: ChannelId, thread: Thread) {
        lock(&self.threads)[channel.index()] = Some(thread);
    }
}

impl Wake for StdWaker<'_> {
    fn wake(&self, channel: ChannelId) {
        if let Some(hook) = &self.hook {
            hook(channel);
        }
        if let Some(thread) = &lock(&self.threads)[channel.index()] {
            thread.unpark();
        }
    }

    fn idle(&self, _channel: ChannelId) {
        // Woken early by `wake`; the timeout bounds the cost of a wake-up that raced the park.
        thread::park_timeout(IDLE_PARK);
    }
}

/// The [`Platform`] that runs each channel worker on its own named, scoped OS thread.
///
/// Its [`Platform::Handle`] is a plain token: the OS join handles stay inside the platform, so a
/// coordinator declared outside [`run_scoped`] can hold the tokens and be borrowed by the workers.
pub struct ScopedPlatform<'p, 'scope, 'env, F> {
    scope: &'scope Scope<'scope, 'env>,
    role: Role,
    worker: &'scope F,
    waker: &'scope StdWaker<'scope>,
    joins: &'p Mutex<Vec<Option<ScopedJoinHandle<'scope, ()>>>>,
}

impl<F> fmt::Debug for ScopedPlatform<'_, '_, '_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedPlatform").field("role", &self.role).field("waker", self.waker).finish_non_exhaustive()
    }
}

impl<F> ScopedPlatform<'_, '_, '_, F> {
    /// Which side these workers serve.
    pub fn role(&self) -> Role {
        self.role
    }
}

/// A worker thread could not be started.
#[derive(Debug)]
pub struct StartError {
    /// The channel.
    pub channel: ChannelId,
    /// What the OS said.
    pub error: io::Error,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: starting its worker thread: {}", self.channel, self.error)
    }
}

impl std::error::Error for StartError {}

/// A started worker of a [`ScopedPlatform`]; only `start` makes one, and `join` consumes it.
#[derive(Debug)]
pub struct WorkerToken(ChannelId);

/// Runs `body` with a [`ScopedPlatform`] whose workers run `worker(channel, waker)` on threads named
/// after `role`. `hook`, if given, is called for a channel whenever the core wakes it (terminate, and
/// right before its join): shut its transport down there. Returns what `body` returns, after every
/// worker thread has ended (a worker the body did not join is joined when the scope closes).
pub fn run_scoped<'h, F, R>(
    role: Role,
    worker: F,
    hook: Option<WakeHook<'h>>,
    body: impl for<'p, 'scope, 'env> FnOnce(&ScopedPlatform<'p, 'scope, 'env, F>) -> R,
) -> R
where
    F: Fn(ChannelId, &StdWaker<'_>) + Sync,
{
    let waker = StdWaker { threads: Mutex::new(vec![None; MAX_CHANNELS]), hook };
    thread::scope(|scope| {
        let joins = Mutex::new((0..MAX_CHANNELS).map(|_| None).collect());
        body(&ScopedPlatform { scope, role, worker: &worker, waker: &waker, joins: &joins })
    })
}

impl<F: Sync> Wake for ScopedPlatform<'_, '_, '_, F> {
    fn wake(&self, channel: ChannelId) {
        self.waker.wake(channel);
    }

    fn idle(&self, channel: ChannelId) {
        self.waker.idle(channel);
    }
}

impl<F> Platform for ScopedPlatform<'_, '_, '_, F>
where
    F: Fn(ChannelId, &StdWaker<'_>) + Sync,
{
    type Handle = WorkerToken;
    type Error = StartError;

    fn start(&self, channel: ChannelId) -> Result<WorkerToken, StartError> {
        let (worker, waker) = (self.worker, self.waker);
        let handle = thread::Builder::new()
            .name(self.role.thread_name(channel))
            .spawn_scoped(self.scope, move || worker(channel, waker))
            .map_err(|error| StartError { channel, error })?;
        self.waker.register(channel, handle.thread().clone());
        lock(self.joins)[channel.index()] = Some(handle);
        Ok(WorkerToken(channel))
    }

    fn join(&self, _channel: ChannelId, token: WorkerToken) -> WorkerExit {
        let handle = lock(self.joins)[token.0.index()].take();
        match handle.map(ScopedJoinHandle::join) {
            Some(Ok(())) => WorkerExit::Returned,
            Some(Err(_)) => WorkerExit::Panicked,
            // Local invariant: a token exists only for a handle stored by `start`, taken once here.
            None => unreachable!("multifd: join of {} without a started thread", token.0),
        }
    }
}

/// Locks `m`, tolerating poisoning: the vector of thread handles stays valid whatever panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use multifd_core::lifecycle::Coordinator;

    #[derive(Debug)]
    struct Err(#[allow(dead_code)] io::ErrorKind);
    impl From<StartError> for Err {
        fn from(e: StartError) -> Self {
            Err(e.error.kind())
        }
    }

    #[test]
    fn workers_run_on_named_threads_and_are_joined() {
        let coord: Coordinator<WorkerToken, Err, 4> = Coordinator::new(3).unwrap();
        let names = Mutex::new(Vec::new());
        let report = run_scoped(
            Role::Recv,
            |c, _waker| lock(&names).push((c.0, thread::current().name().map(str::to_owned))),
            None,
            |p| {
                assert_eq!(p.role(), Role::Recv);
                coord.create_all(p, |_| Ok(())).unwrap();
                coord.cleanup(p).unwrap().report()
            },
        );
        assert_eq!(report.joined, 3);
        let mut names = names.into_inner().unwrap();
        names.sort();
        let want: Vec<_> = (0..3u8).map(|c| (c, Some(format!("multifd-recv-{c}")))).collect();
        assert_eq!(names, want);
    }
}
