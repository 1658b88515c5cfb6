//! Sides measured alike: a [`Pair`] holds one value for each snapshotter, and [`alternate`]
//! runs a workload's rounds on two sides or more, taking turns.

use std::ops::Range;

use crate::server::Kind;

/// One value for each snapshotter.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pair<T> {
    pub lamina: T,
    pub overlay: T,
}

impl<T> Pair<T> {
    /// Each side's value, made from its [`Kind`].
    pub fn new(mut f: impl FnMut(Kind) -> T) -> Pair<T> {
        Pair {
            lamina: f(Kind::Lamina),
            overlay: f(Kind::Overlay),
        }
    }

    pub fn as_ref(&self) -> Pair<&T> {
        Pair {
            lamina: &self.lamina,
            overlay: &self.overlay,
        }
    }

    pub fn as_mut(&mut self) -> Pair<&mut T> {
        Pair {
            lamina: &mut self.lamina,
            overlay: &mut self.overlay,
        }
    }

    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Pair<U> {
        Pair {
            lamina: f(self.lamina),
            overlay: f(self.overlay),
        }
    }

    /// Both sides, lamina's first: what [`alternate`] takes.
    pub fn each_mut(&mut self) -> [&mut T; 2] {
        [&mut self.lamina, &mut self.overlay]
    }
}

/// `n` split into `rounds` chunks: the range of round `r`.
pub fn chunk(n: usize, rounds: usize, r: usize) -> Range<usize> {
    (n * r / rounds)..(n * (r + 1) / rounds)
}

/// Runs round `r` of a workload for each `r` in `rounds`, on all `sides`, taking turns: round
/// `r` starts with side `r mod N` (of two sides, the first goes first in even rounds and the
/// second in odd ones). Alternating who goes first, as well as cutting a workload into rounds,
/// is what lets the sides meet the same disk and CPU weather: a burst of other work, or the
/// writeback the previous turn left behind, hits each about equally instead of always the same
/// one.
pub async fn alternate<S, const N: usize>(
    rounds: Range<usize>,
    sides: [&mut S; N],
    mut turn: impl AsyncFnMut(usize, &mut S),
) {
    for r in rounds {
        for i in 0..N {
            turn(r, &mut *sides[(r + i) % N]).await;
        }
    }
}
