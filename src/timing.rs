//! The one timing model shared by the simulator and the fake backend: a load takes a fixed
//! latency plus bytes over a bandwidth, a request holds its model for prefill (per prompt token)
//! plus decode (per generated token), an unload takes a fixed time.
//!
//! Every duration is computed here, in integer nanoseconds, with the same rounding for both
//! users: the simulator schedules its virtual events with these values and the fake backend
//! sleeps to absolute deadlines built from them, so a fake server and a simulation configured
//! with the same [`TimingModel`] are meant to agree (the server's only extra is the jitter of
//! its timers and of HTTP, a few milliseconds).

use std::time::Duration;

use serde::{Deserialize, Serialize};

const NS: f64 = 1e9;

/// Round seconds to nanoseconds (negative or NaN: 0; beyond `u64`: saturated).
fn ns(secs: f64) -> u64 {
    if secs.is_finite() && secs > 0.0 { (secs * NS).round().min(u64::MAX as f64) as u64 } else { 0 }
}

/// Load, service and unload times. Wire form (the admin API's `timing`): the fields below, with
/// `load_bandwidth` `null` for instant transfers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimingModel {
    /// Fixed part of every load, seconds.
    pub load_latency_secs: f64,
    /// Bytes per second a load reads; `None` (JSON `null`): transfers are instant.
    pub load_bandwidth: Option<f64>,
    /// Seconds from the decision to unload a model to its memory coming back.
    pub unload_secs: f64,
    /// Service seconds per prompt token (prefill).
    pub prefill_secs_per_token: f64,
    /// Service seconds per generated token (decode).
    pub decode_secs_per_token: f64,
}

impl Default for TimingModel {
    /// Everything instant.
    fn default() -> Self {
        TimingModel {
            load_latency_secs: 0.0,
            load_bandwidth: None,
            unload_secs: 0.0,
            prefill_secs_per_token: 0.0,
            decode_secs_per_token: 0.0,
        }
    }
}

impl TimingModel {
    /// Check every field; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        for (v, name) in [
            (self.load_latency_secs, "load latency"),
            (self.unload_secs, "unload time"),
            (self.prefill_secs_per_token, "prefill time per token"),
            (self.decode_secs_per_token, "decode time per token"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0 (got {v})"));
            }
        }
        match self.load_bandwidth {
            Some(b) if b.is_nan() || b <= 0.0 => Err("load bandwidth must be > 0 bytes/s (or inf)".into()),
            _ => Ok(()),
        }
    }

    /// Seconds a load of `bytes` takes: latency + bytes / bandwidth.
    pub fn load_secs(&self, bytes: u64) -> f64 {
        let transfer = match self.load_bandwidth {
            Some(b) if b.is_finite() => bytes as f64 / b,
            _ => 0.0,
        };
        self.load_latency_secs + transfer
    }

    /// [`Self::load_secs`] in nanoseconds (rounded once, the same for every caller).
    pub fn load_nanos(&self, bytes: u64) -> u64 {
        ns(self.load_secs(bytes))
    }

    /// Nanoseconds per prompt token.
    pub fn prefill_nanos(&self) -> u64 {
        ns(self.prefill_secs_per_token)
    }

    /// Nanoseconds per generated token.
    pub fn decode_nanos(&self) -> u64 {
        ns(self.decode_secs_per_token)
    }

    /// The retry hints' prior service time per token of a request's context (prompt plus
    /// maximum new tokens) until a model's own rate is measured: the decode time per token, an
    /// upper bound (prompt tokens cost the smaller prefill time, and a request may stop before
    /// its maximum). `None` when decoding is modelled as instant.
    pub fn service_prior_ns_per_token(&self) -> Option<f64> {
        (self.decode_secs_per_token > 0.0).then_some(self.decode_secs_per_token * 1e9)
    }

    /// Nanoseconds an unload takes.
    pub fn unload_nanos(&self) -> u64 {
        ns(self.unload_secs)
    }

    /// Nanoseconds a request of `input` prompt and `output` generated tokens holds its model:
    /// `input x prefill + output x decode` (each per-token time rounded first, saturating).
    pub fn service_nanos(&self, input: u64, output: u64) -> u64 {
        input.saturating_mul(self.prefill_nanos()).saturating_add(output.saturating_mul(self.decode_nanos()))
    }

    /// The end of generated token `i` (0-based) of a generation that started at 0 with
    /// `input` prompt tokens: `input x prefill + (i + 1) x decode`. The fake backend sleeps to
    /// these absolute deadlines, so its timing does not drift with the number of tokens.
    pub fn token_deadline(&self, input: u64, i: u64) -> Duration {
        Duration::from_nanos(self.service_nanos(input, i.saturating_add(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_and_service_times_follow_the_formula() {
        let t = TimingModel {
            load_latency_secs: 0.25,
            load_bandwidth: Some(1e9),
            unload_secs: 0.05,
            prefill_secs_per_token: 0.000_2,
            decode_secs_per_token: 0.02,
        };
        assert_eq!(t.load_nanos(2_000_000_000), 2_250_000_000);
        assert_eq!(t.unload_nanos(), 50_000_000);
        assert_eq!(t.service_nanos(100, 10), 100 * 200_000 + 10 * 20_000_000);
        assert_eq!(t.token_deadline(100, 0), Duration::from_nanos(20_000_000 + 20_000_000));
        assert_eq!(t.token_deadline(100, 9), Duration::from_nanos(t.service_nanos(100, 10)));
        let instant = TimingModel { load_bandwidth: Some(f64::INFINITY), ..TimingModel::default() };
        assert_eq!(instant.load_nanos(u64::MAX), 0);
        assert_eq!(t.service_nanos(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn bad_values_are_named() {
        let bad = TimingModel { decode_secs_per_token: -1.0, ..TimingModel::default() };
        assert!(bad.validate().unwrap_err().contains("decode"));
        let bad = TimingModel { load_bandwidth: Some(0.0), ..TimingModel::default() };
        assert!(bad.validate().unwrap_err().contains("bandwidth"));
        assert!(TimingModel::default().validate().is_ok());
    }
}
