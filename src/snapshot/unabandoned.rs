//! A future that finishes even when its caller stops waiting for it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tracing::warn;

/// A future that, dropped before it is done, finishes anyway as a task of its own. Spawning
/// every change up front would do the same but costs a hand-off between threads per request.
pub(super) struct Unabandoned<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send;

impl<F: Future + Send + 'static> Unabandoned<F>
where
    F::Output: Send,
{
    pub(super) fn new(fut: F) -> Self {
        Unabandoned(Some(Box::pin(fut)))
    }
}

impl<F: Future + Send + 'static> Future for Unabandoned<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let fut = self.0.as_mut().expect("polled after completion");
        let out = fut.as_mut().poll(cx);
        if out.is_ready() {
            self.0 = None;
        }
        out
    }
}

impl<F: Future + Send + 'static> Drop for Unabandoned<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        if let Some(rest) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(rest)),
                // Only when the runtime itself is going away; start-up recovery finishes it.
                Err(_) => warn!("a change was abandoned midway as lamina stopped"),
            }
        }
    }
}
