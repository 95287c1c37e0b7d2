//! Wakes a future makes of its own task while it is being polled, absorbed.
//!
//! hyper's HTTP/1.1 connections wake their own task, on both sides:
//! - A runtime call drives its connection inside the call (see
//!   [`crate::runtime::protocol`]): handing the request to the connection
//!   wakes the connection, and the connection handing the answer back wakes
//!   the call, and both are polled by the same task at that moment.
//! - The server's connection task polls the handler: a handler that reads
//!   the request's body takes it from hyper's channel, which wakes the
//!   channel's sender, the connection, polled by that same task.
//!
//! Tokio then polls the task again later, as a task that yielded, and a
//! yield wakes the other worker thread to share the work (which steals the
//! task): a futex wake and a context switch per wake (on these machines
//! tens of microseconds each), for nothing that could run in parallel.
//! [`without_self_wakes`] polls the future again at once instead, and
//! passes on only the wakes that come while it waits.
//!
//! # Layout
//!
//! - [`without_self_wakes`]: the wrapper.
//! - `Relay`: the waker the wrapped future sees; a small state machine
//!   (idle, polling, woken while polling) in one atomic.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// Polls again at most this often in a row before passing a wake on (a
/// future that wakes itself on purpose, to yield, still yields).
const REPOLLS: usize = 4;

/// The waker the wrapped future is polled with.
#[derive(Default)]
struct Relay {
    state: AtomicU8,
    /// The task's own waker, as of its latest poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // Being polled: it is polled again before the task sleeps.
            Ok(_) | Err(WOKEN) => {}
            _ => {
                if let Some(task) = self.task.lock().unwrap().as_ref() {
                    task.wake_by_ref();
                }
            }
        }
    }
}

/// `future`, with the wakes it makes of its own task while polled turned
/// into an immediate poll (see the module's documentation).
pub async fn without_self_wakes<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let relay = Arc::new(Relay::default());
    let waker = Waker::from(relay.clone());
    std::future::poll_fn(|cx| {
        {
            let mut task = relay.task.lock().unwrap();
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        for _ in 0..REPOLLS {
            relay.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(out) = future.as_mut().poll(&mut Context::from_waker(&waker)) {
                relay.state.store(IDLE, Ordering::Release);
                return Poll::Ready(out);
            }
            if relay
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Still waking itself: let the task yield.
        relay.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes of the task that polls it.
    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_during_the_poll_becomes_a_poll_and_a_later_one_reaches_the_task() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&task);
        let later: Arc<Mutex<Option<Waker>>> = Arc::default();
        let mut polls = 0;
        let later_in = later.clone();
        // Wakes itself on its first poll (as handing a request to a
        // connection polled by the same task does), then waits for a wake
        // from outside, then is done.
        let inner = std::future::poll_fn(move |cx| {
            polls += 1;
            match polls {
                1 => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                2 => {
                    *later_in.lock().unwrap() = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(polls),
            }
        });
        let mut outer = std::pin::pin!(without_self_wakes(inner));
        assert!(outer.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 0, "the self-wake reached the task");
        later.lock().unwrap().take().unwrap().wake();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "the outside wake was lost");
        assert_eq!(outer.as_mut().poll(&mut cx), Poll::Ready(3));
    }

    #[test]
    fn a_future_that_keeps_waking_itself_still_yields() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&task);
        let inner = std::future::poll_fn(|cx: &mut Context<'_>| -> Poll<()> {
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        let mut outer = std::pin::pin!(without_self_wakes(inner));
        assert!(outer.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    }
}
