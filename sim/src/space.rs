//! Keeping a trace's decisions apart in time, so a real server replaying it decides exactly what
//! the simulator predicts.
//!
//! A server sees the events of a trace with a few milliseconds of jitter (HTTP, timers, a busy
//! CPU). Two events closer than that may reach the decision core in either order: a request
//! arriving just as a load finishes is a `join` in one order and a `hit` in the other. The
//! simulator's order is only a prediction of the server's when no two events of different causes
//! are closer than the jitter.
//!
//! [`decision_gap`] measures a trace under a configuration: the smallest time between two events
//! of the replay (arrivals, load ends, lease ends, unload ends, queue deadlines) that come from
//! different trace operations. Events of one operation (a request's load end and its lease end)
//! follow each other causally and are not counted. [`space`] moves arrivals later until that gap
//! is at least a margin: it replays, finds the earliest pair closer than the margin, delays the
//! operation that caused the later event just enough, and repeats.

use modelpool::Nanos;

use crate::config::SimConfig;
use crate::replay::{Mark, run_recorded};
use crate::trace::Trace;

/// The closest pair of events with different causes in a recorded replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// Time between them.
    pub gap: Nanos,
    /// The earlier event.
    pub first: Mark,
    /// The later event.
    pub second: Mark,
}

/// The earliest pair of events closer than `margin` (different causes), scanning marks in time
/// order; `None` when every such pair is at least `margin` apart.
fn first_conflict(marks: &[Mark], margin: Nanos) -> Option<Gap> {
    let mut sorted: Vec<Mark> = marks.to_vec();
    sorted.sort_by_key(|m| m.at);
    for j in 1..sorted.len() {
        let b = sorted[j];
        for i in (0..j).rev() {
            let a = sorted[i];
            if b.at - a.at >= margin {
                break;
            }
            if a.cause != b.cause {
                return Some(Gap { gap: b.at - a.at, first: a, second: b });
            }
        }
    }
    None
}

/// The smallest gap between two events of different causes when `trace` replays under `cfg`
/// (`None`: fewer than two such events).
pub fn decision_gap(trace: &Trace, cfg: &SimConfig) -> Result<Option<Gap>, String> {
    let (_, rec) = run_recorded(trace, cfg)?;
    let mut sorted = rec.marks;
    sorted.sort_by_key(|m| m.at);
    let mut best: Option<Gap> = None;
    for j in 1..sorted.len() {
        let b = sorted[j];
        for i in (0..j).rev() {
            let a = sorted[i];
            if best.is_some_and(|g| b.at - a.at >= g.gap) {
                break;
            }
            if a.cause != b.cause {
                best = Some(Gap { gap: b.at - a.at, first: a, second: b });
                break;
            }
        }
    }
    Ok(best)
}

/// What [`space`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spaced {
    /// The trace with its arrivals moved (a suffix at a time, so still sorted by time).
    pub trace: Trace,
    /// Operations moved (counting repeats).
    pub moves: usize,
    /// The smallest gap left (at least the margin on success).
    pub gap: Option<Gap>,
}

/// Delay arrivals of `trace` until no two events of different causes are closer than `margin`
/// under `cfg`, moving at most `max_moves` times. Deterministic. Errors if the replay fails or
/// the margin cannot be reached within `max_moves`.
pub fn space(trace: &Trace, cfg: &SimConfig, margin: Nanos, max_moves: usize) -> Result<Spaced, String> {
    let mut t = trace.clone();
    for moves in 0..=max_moves {
        let (_, rec) = run_recorded(&t, cfg)?;
        let Some(c) = first_conflict(&rec.marks, margin) else {
            let gap = decision_gap(&t, cfg)?;
            return Ok(Spaced { trace: t, moves, gap });
        };
        // Delay the chain that started later (the larger operation index) and every operation
        // after it, so the rest of the trace keeps its own spacing (moving one operation alone
        // piles moved operations up on one instant). The slack (a quarter margin) keeps a chain
        // of moves from creeping.
        let k = c.first.cause.max(c.second.cause) as usize;
        let slack = margin / 4;
        let shift =
            if k == c.second.cause as usize { margin - c.gap + slack } else { margin + c.gap + slack };
        // A shifted suffix stays sorted: no re-sort.
        for o in &mut t.ops[k..] {
            o.at = o.at.saturating_add(shift);
        }
    }
    Err(format!(
        "could not space the trace's events {} ms apart within {max_moves} moves (too dense for this margin)",
        margin / 1_000_000
    ))
}
