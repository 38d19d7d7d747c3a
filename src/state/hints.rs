//! Retry hints: when in-flight work is expected to free memory or a model slot. They feed the
//! `Retry-After` of a refusal; they never change a decision.

use super::{Entry, Phase, PoolState};
use crate::estimate::SizeEstimator;
use crate::policy::EvictionPolicy;
use crate::types::{NANOS_PER_SEC, Nanos};

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    fn lease_nanos(&self) -> f64 {
        self.ewma_lease.unwrap_or(NANOS_PER_SEC as f64)
    }

    pub(super) fn drain_hint(&self, e: &Entry, now: Nanos) -> u32 {
        let t = if e.leases > 0 { self.busy_until(e, now) } else { now as f64 };
        secs_until(t, now)
    }

    /// When a busy model's requests are expected to have ended: at the expected end of their
    /// work (each lease's context tokens at the model's measured service rate per token, else
    /// the configured prior) while that is still ahead. Without a rate, or once the work has
    /// overrun its estimate: after the typical request time if it has been busy for less than
    /// that; otherwise, as long again as it has been busy so far (a request that has outlived
    /// the mean is likely a long one).
    fn busy_until(&self, e: &Entry, now: Nanos) -> f64 {
        if e.work_end > now {
            return e.work_end as f64;
        }
        let elapsed = now.saturating_sub(e.busy_since) as f64;
        let lease = self.lease_nanos();
        let remaining = if elapsed < lease { lease - elapsed } else { elapsed };
        now as f64 + remaining
    }

    /// Seconds until in-flight work is expected to free `bytes` and `count` models: busy models
    /// free after their typical request time, loads after their modelled load time plus that.
    pub(super) fn retry_hint(&self, now: Nanos, bytes: u64, count: usize) -> u32 {
        let lease = self.lease_nanos();
        // A buffer kept between calls: refusals and queueing allocate nothing once it has grown.
        let mut frees = self.hint_buf.take();
        frees.clear();
        for e in &self.entries {
            match e.phase {
                // Its requests' end frees their KV and makes the model evictable.
                Phase::Resident if !e.pinned && e.leases > 0 => {
                    frees.push((self.busy_until(e, now), e.bytes.saturating_add(e.kv), 1));
                }
                Phase::Resident if e.leases > 0 => frees.push((self.busy_until(e, now), e.kv, 0)),
                Phase::Draining => {
                    let t = if e.leases > 0 { self.busy_until(e, now) } else { now as f64 };
                    frees.push((t, e.bytes.saturating_add(e.kv), 0));
                }
                Phase::Loading if !e.pin_on_load => {
                    let load = self.load_cost(e, e.bytes) * NANOS_PER_SEC as f64;
                    frees.push(((e.load_started as f64 + load).max(now as f64) + lease, e.bytes, 1));
                }
                _ => {}
            }
        }
        frees.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut b, mut c) = (0u64, 0usize);
        let mut when = now as f64 + lease;
        for &(t, fb, fc) in &frees {
            b = b.saturating_add(fb);
            c += fc;
            when = t;
            if b >= bytes && c >= count {
                break;
            }
        }
        self.hint_buf.set(frees);
        secs_until(when, now)
    }
}

fn secs_until(t: f64, now: Nanos) -> u32 {
    let secs = ((t - now as f64) / NANOS_PER_SEC as f64).ceil();
    secs.clamp(1.0, 3600.0) as u32
}
