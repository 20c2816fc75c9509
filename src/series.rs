//! The bounded per-run series that both the dashboard (its charts) and the daemon (the
//! replay it sends attaching clients) keep: how long they are, and pushing onto one.

use std::collections::VecDeque;

/// Most step points kept per run: older ones are dropped from the dashboard's charts and
/// from the daemon's replay.
pub const MAX_POINTS: usize = 4096;

/// Appends `item` to `q`, first dropping the oldest entries so that at most `max` remain.
pub fn push_bounded<T>(q: &mut VecDeque<T>, item: T, max: usize) {
    while q.len() >= max.max(1) {
        q.pop_front();
    }
    q.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest() {
        let mut q = VecDeque::new();
        for i in 0..5 {
            push_bounded(&mut q, i, 3);
        }
        assert_eq!(q, [2, 3, 4]);
    }
}
