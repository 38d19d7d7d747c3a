//! The admission queue: requests that would be refused now but can be served once in-flight
//! work ends wait here instead of getting a 503.
//!
//! Who waits: a request (not a preload) whose admission would be refused with a retry hint,
//! i.e. memory or model slots are held by busy, loading or draining models (`insufficient_memory`,
//! `max_models_reached` with busy slots, `model_draining`). Refusals that waiting cannot cure
//! (`model_too_large`, every slot pinned) are still immediate. A zero `queue_timeout` turns the
//! queue off: every refusal is immediate, exactly as before the queue existed.
//!
//! Bounds: at most `max_queue` waiters (one more is refused with `queue_full`); a waiter is
//! refused with `queue_timeout` once it has waited `queue_timeout`. Time only moves when the
//! driver says so: it calls [`PoolState::queue_tick`] at [`PoolState::next_queue_deadline`]
//! (when the oldest waiter starts starving or runs out of time).
//!
//! Order, re-examined on every event that frees capacity (a lease ends, a victim is reclaimed,
//! a load finishes or fails, an unpin, a limit change, an expiry, a waiter leaving):
//! 1. Requests whose model is now resident or loading are admitted first, whatever their place
//!    (hits stay hits; a join costs nothing): they never wait behind loads.
//! 2. Then loads, in arrival order. A waiter that does not fit yet is skipped, so a small model
//!    never waits behind a 40 GB one (no head-of-line blocking) ...
//! 3. ... until the oldest waiter has waited half the queue timeout: then it is *starving*, and
//!    no later waiter may start a load before it does (joins and hits still pass), so a big model
//!    cannot be starved by a stream of small ones. New arrivals queue behind it too.
//!
//! Anti-thrash: a resident model with requests of its own in the queue is never a victim (see
//! `evictable`): evicting it would only reload it at once.

use super::{Admission, Intent, Phase, PoolState, Rejection, Ticket, Wake};
use crate::estimate::SizeEstimator;
use crate::log::{Event, RejectCode};
use crate::policy::{EvictionPolicy, Slot};
use crate::types::Nanos;

/// One waiting request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    pub(super) ticket: Ticket,
    pub(super) slot: Slot,
    pub(super) arrived: Nanos,
    /// KV bytes the request asks for beside the weights.
    pub(super) kv: u64,
}

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// Whether the queue is on (`queue_timeout > 0`).
    #[inline]
    pub(super) fn queue_on(&self) -> bool {
        self.cfg.queue_timeout > 0
    }

    /// Whether the oldest waiter has waited half the timeout: later waiters and new arrivals
    /// may no longer start loads before it.
    pub(super) fn head_starving(&self, now: Nanos) -> bool {
        self.queue.front().is_some_and(|q| now.saturating_sub(q.arrived) >= self.cfg.queue_timeout / 2)
    }

    /// What a refusal `r` of a request becomes: queued (with the ticket it would get), refused
    /// as `queue_full`, or refused as is. Changes nothing.
    pub(super) fn queue_outcome(&self, intent: Intent, r: Rejection) -> Admission {
        if intent != Intent::Request || !self.queue_on() || r.retry_after_secs.is_none() {
            return Admission::Reject(r);
        }
        if self.queue.len() >= self.cfg.max_queue {
            return Admission::Reject(Rejection { code: RejectCode::QueueFull, ..r });
        }
        Admission::Queued(self.next_ticket)
    }

    /// Carry out [`PoolState::queue_outcome`]: enqueue, or record the refusal.
    pub(super) fn queue_or_reject(
        &mut self,
        slot: Slot,
        now: Nanos,
        intent: Intent,
        r: Rejection,
        kv: u64,
    ) -> Admission {
        let outcome = self.queue_outcome(intent, r);
        match outcome {
            Admission::Queued(ticket) => {
                self.next_ticket += 1;
                self.queue.push_back(Queued { ticket, slot, arrived: now, kv });
                self.entries[slot as usize].queued += 1;
                self.stats.queued += 1;
                self.stats.peak_queue = self.stats.peak_queue.max(self.queue.len() as u64);
                let model = &self.entries[slot as usize].spec.id;
                self.log.push_with(|| Event::Queued { at: now, model: model.clone(), ticket });
            }
            Admission::Reject(r) => self.record_reject(slot, now, r),
            _ => unreachable!("queue_outcome queues or refuses"),
        }
        outcome
    }

    /// Requests waiting in the queue now.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The next time the queue changes by itself, if anything waits: when the oldest waiter
    /// starts starving (half the timeout) or, after that, runs out of time (every waiter has the
    /// same timeout, so the oldest is first). The driver calls [`PoolState::queue_tick`] then.
    pub fn next_queue_deadline(&self, now: Nanos) -> Option<Nanos> {
        self.queue.front().map(|q| {
            let starve = q.arrived.saturating_add(self.cfg.queue_timeout / 2);
            if starve > now { starve } else { q.arrived.saturating_add(self.cfg.queue_timeout) }
        })
    }

    /// Time passed (the driver's timer at [`PoolState::next_queue_deadline`]): waiters past their
    /// timeout are refused with `queue_timeout`, and a newly starving head gets its turn. Results
    /// are in [`PoolState::take_wakes`].
    pub fn queue_tick(&mut self, now: Nanos) {
        self.pump(now);
    }

    /// Admissions decided for queued requests since the last call, in the order they were
    /// decided. The driver takes them after every call that can free capacity
    /// ([`PoolState::release`], [`PoolState::release_unused`], [`PoolState::reclaimed`],
    /// [`PoolState::load_finished`], [`PoolState::unpin`], [`PoolState::set_limits`],
    /// [`PoolState::expire_idle`], [`PoolState::cancel_queued`], [`PoolState::queue_tick`]) and
    /// carries each out like a direct admission.
    pub fn take_wakes(&mut self) -> std::vec::Drain<'_, Wake> {
        self.wakes.drain(..)
    }

    /// Whether admissions for queued requests are waiting to be taken.
    #[inline]
    pub fn has_wakes(&self) -> bool {
        !self.wakes.is_empty()
    }

    /// A queued request went away (client disconnect, dropped future): it leaves the queue.
    /// Returns `false` if the ticket is not queued (already admitted: the driver then undoes its
    /// [`Wake`] instead, e.g. ends the granted lease with [`PoolState::release_unused`]).
    pub fn cancel_queued(&mut self, ticket: Ticket, now: Nanos) -> bool {
        let Some(i) = self.queue.iter().position(|q| q.ticket == ticket) else { return false };
        self.remove_queued(i);
        // A starving head leaving may let others in.
        self.pump(now);
        true
    }

    /// Remove every waiter (shutdown); returns their tickets. They are not counted as refused.
    pub fn drain_queue(&mut self) -> Vec<Ticket> {
        let tickets: Vec<Ticket> = self.queue.iter().map(|q| q.ticket).collect();
        while !self.queue.is_empty() {
            self.remove_queued(0);
        }
        tickets
    }

    fn remove_queued(&mut self, i: usize) -> Queued {
        let q = self.queue.remove(i).expect("index in the queue");
        self.entries[q.slot as usize].queued -= 1;
        q
    }

    fn timeout_rejection(&self, q: Queued, now: Nanos) -> Rejection {
        let need = self.entries[q.slot as usize].need().saturating_add(q.kv);
        let retry = match self.plan_load(q.slot, now, q.kv) {
            Err(r) => r.retry_after_secs,
            Ok(_) => None,
        };
        Rejection {
            kv: q.kv,
            code: RejectCode::QueueTimeout,
            need,
            available: 0,
            retry_after_secs: Some(retry.unwrap_or(1)),
            waited: now.saturating_sub(q.arrived),
        }
    }

    fn wake(&mut self, q: Queued, outcome: Admission) {
        if !matches!(outcome, Admission::Reject(_)) {
            self.stats.dequeued += 1;
        }
        self.wakes.push(Wake { ticket: q.ticket, slot: q.slot, queued_at: q.arrived, kv: q.kv, outcome });
    }

    /// Refuse the waiter at queue index `i` with `r` (waiting can no longer help it).
    fn refuse_queued(&mut self, i: usize, q: Queued, r: Rejection, now: Nanos) {
        self.remove_queued(i);
        let r = Rejection { waited: now.saturating_sub(q.arrived), ..r };
        self.record_reject(q.slot, now, r);
        self.wake(q, Admission::Reject(r));
    }

    /// [`PoolState::pump`] off the hot path (a lease ending with requests queued is rare).
    #[cold]
    #[inline(never)]
    pub(super) fn pump_cold(&mut self, now: Nanos) {
        self.pump(now);
    }

    /// Re-examine the queue after capacity may have come free (see the module docs for the
    /// order). Every admission decided is carried out in the ledger and left in the wakes.
    pub(super) fn pump(&mut self, now: Nanos) {
        if self.queue.is_empty() {
            return;
        }
        // Pass 1: deadlines, hits and joins.
        let mut i = 0;
        while i < self.queue.len() {
            let q = self.queue[i];
            if now >= q.arrived.saturating_add(self.cfg.queue_timeout) {
                self.remove_queued(i);
                let r = self.timeout_rejection(q, now);
                self.record_reject(q.slot, now, r);
                self.wake(q, Admission::Reject(r));
                continue;
            }
            match self.entries[q.slot as usize].phase {
                Phase::Resident | Phase::Loading if self.kv_fits(q.kv) => {
                    self.remove_queued(i);
                    let outcome = self.admit_kv(q.slot, now, Intent::Request, q.kv);
                    debug_assert!(matches!(outcome, Admission::Hit | Admission::Join));
                    self.wake(q, outcome);
                }
                // Its KV does not fit beside its model yet: make room if idle models can.
                Phase::Resident | Phase::Loading => match self.plan_kv_room(q.slot, now, q.kv) {
                    Ok(victims) => {
                        self.evict_for_kv(q.slot, now, &victims);
                        i += 1;
                    }
                    Err(r) if r.retry_after_secs.is_none() => self.refuse_queued(i, q, r, now),
                    Err(_) => i += 1,
                },
                _ => i += 1,
            }
        }
        // Pass 2: loads in arrival order, skipping what does not fit yet unless the head starves.
        let starving = self.head_starving(now);
        let mut i = 0;
        while i < self.queue.len() {
            let q = self.queue[i];
            match self.entries[q.slot as usize].phase {
                // A load started earlier in this pass: join it.
                Phase::Loading | Phase::Resident if self.kv_fits(q.kv) => {
                    self.remove_queued(i);
                    let outcome = self.admit_kv(q.slot, now, Intent::Request, q.kv);
                    self.wake(q, outcome);
                }
                Phase::Absent if !(starving && i > 0) => match self.plan_load(q.slot, now, q.kv) {
                    Ok(plan) => {
                        self.remove_queued(i);
                        self.commit_load(q.slot, now, Intent::Request, &plan);
                        self.wake(q, Admission::Load(plan));
                    }
                    // Waiting stopped being able to help (pins, a lowered limit).
                    Err(r) if r.retry_after_secs.is_none() => self.refuse_queued(i, q, r, now),
                    Err(_) => i += 1,
                },
                // Draining: waits for its unload (`reclaimed` pumps again); or behind a starving head.
                _ => i += 1,
            }
        }
    }
}
