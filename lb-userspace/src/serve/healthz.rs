//! `/healthz` like kube-proxy's: 200 while the agent keeps the datapath in sync, 503 when
//! its loop stalls or a wanted sync has been failing (or waiting for the source) too long.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A wanted sync older than this makes the agent unhealthy.
pub const SYNC_STALL: Duration = Duration::from_secs(30);
/// A loop iteration older than this makes the agent unhealthy (it runs every 100 ms).
pub const LOOP_STALL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub started: Instant,
    pub last_loop: Instant,
    /// Since when a sync is wanted but not done (None: in sync).
    pub pending_since: Option<Instant>,
    pub last_synced: Option<SystemTime>,
}

impl Default for Health {
    fn default() -> Self {
        let now = Instant::now();
        Health {
            started: now,
            last_loop: now,
            // Nothing is in sync before the first sync.
            pending_since: Some(now),
            last_synced: None,
        }
    }
}

impl Health {
    pub fn healthy(&self, now: Instant) -> bool {
        now.duration_since(self.last_loop) < LOOP_STALL
            && self
                .pending_since
                .is_none_or(|since| now.duration_since(since) < SYNC_STALL)
    }

    /// Status line and kube-proxy's JSON body.
    pub fn response(&self, now: Instant, wall: SystemTime) -> (&'static str, String) {
        let status = if self.healthy(now) {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        let body = serde_json::json!({
            "lastUpdated": go_time(self.last_synced.unwrap_or(UNIX_EPOCH)),
            "currentTime": go_time(wall),
            "nodeEligible": true,
        });
        (status, body.to_string())
    }
}

/// Go's `time.Time.String()` in UTC, as kube-proxy prints it:
/// `2006-01-02 15:04:05.999999999 +0000 UTC`.
pub fn go_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = d.subsec_nanos();
    if nanos > 0 {
        out.push_str(format!(".{nanos:09}").trim_end_matches('0'));
    }
    out.push_str(" +0000 UTC");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_format() {
        let t = UNIX_EPOCH + Duration::new(1_732_448_024, 120_000_000);
        assert_eq!(go_time(t), "2024-11-24 11:33:44.12 +0000 UTC");
        assert_eq!(go_time(UNIX_EPOCH), "1970-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn healthy_until_syncs_or_the_loop_stall() {
        let start = Instant::now();
        let mut h = Health {
            started: start,
            last_loop: start,
            pending_since: Some(start),
            last_synced: None,
        };
        assert!(
            h.healthy(start + Duration::from_secs(5)),
            "waiting for the source briefly"
        );
        assert!(!h.healthy(start + SYNC_STALL), "never synced");
        h.pending_since = None;
        h.last_synced = Some(SystemTime::now());
        assert!(h.healthy(start + Duration::from_secs(5)));
        assert!(!h.healthy(start + LOOP_STALL), "loop stalled");
        let (status, body) = h.response(start, SystemTime::now());
        assert_eq!(status, "200 OK");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["nodeEligible"], true);
        assert!(
            json["lastUpdated"]
                .as_str()
                .is_some_and(|t| t.ends_with("+0000 UTC"))
        );
    }
}
