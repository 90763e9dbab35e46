//! Cron schedules without I/O: parsing an expression in a time zone, the next run times, and which
//! ticks a scheduler runs when it finds a schedule due (the `missed` policy). The scheduler task is
//! [`crate::scheduler`]; the table is `schedules` (db/migrations/V6__schedules.sql).
//!
//! The arithmetic is croner's, in the schedule's IANA zone from chrono-tz, and daylight saving time
//! follows croner's rules for fixed-time jobs: a local time that does not exist (spring forward) runs
//! once at the first valid instant after the gap, and one that occurs twice (fall back) runs once, at
//! its first occurrence. Interval-like fields (`*/5` minutes) simply follow real time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::job::FieldError;

/// Longest schedule name (the `schedules_name_valid` constraint; plain characters only).
pub const NAME_MAX: usize = 128;
/// A tick found later than this is *missed* (the instances were down or stalled); a tick found
/// sooner is merely *late* and always runs, whatever the policy, so a busy scheduler never drops one.
pub const LATE_GRACE: Duration = Duration::from_secs(30);
/// At most this many missed ticks are run with `missed = all`: the latest ones.
pub const MAX_CATCH_UP: usize = 100;
/// How many upcoming run times the API shows.
pub const UPCOMING: usize = 5;
/// Bound on the ticks walked to find the late ones (an every-second schedule has 30 in the grace).
const MAX_LATE: usize = 1000;

/// What a scheduler does with ticks that were missed (more than [`LATE_GRACE`] late).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// None of them runs; the schedule goes on with the next future tick.
    #[default]
    Skip,
    /// One job, for the latest missed tick.
    Once,
    /// One job per missed tick, at most [`MAX_CATCH_UP`] (the latest).
    All,
}

impl Missed {
    pub fn parse(s: &str) -> Option<Missed> {
        match s {
            "skip" => Some(Missed::Skip),
            "once" => Some(Missed::Once),
            "all" => Some(Missed::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::Once => "once",
            Missed::All => "all",
        }
    }
}

/// A schedule name as the `schedules_name_valid` constraint admits it.
pub fn check_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            format!("must be 1 to {NAME_MAX} letters, digits, '.', '_', ':' or '-', starting with a letter or digit"),
        ))
    }
}

/// A parsed cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct Timetable {
    cron: Cron,
    tz: Tz,
}

impl Timetable {
    /// Parses `cron` (five fields, six with seconds first, or an `@hourly`-style alias) and the IANA
    /// zone `timezone`; an error names the field (`cron` or `timezone`) and what is wrong.
    pub fn parse(cron: &str, timezone: &str) -> Result<Timetable, FieldError> {
        let fields = cron.split_whitespace().count();
        if !cron.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(FieldError::new(
                "cron",
                format!("expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, got {fields}"),
            ));
        }
        let parser = CronParser::builder().seconds(Seconds::Optional).year(Year::Disallowed).build();
        let parsed = parser.parse(cron).map_err(|e| FieldError::new("cron", format!("{cron:?}: {e}")))?;
        let tz: Tz = timezone.parse().map_err(|_| {
            FieldError::new("timezone", format!("{timezone:?} is not an IANA time zone (e.g. UTC, Europe/Berlin)"))
        })?;
        let table = Timetable { cron: parsed, tz };
        // An expression that never matches (the 31st of February) would leave next_run_at empty.
        if table.next_after(Utc::now()).is_none() {
            return Err(FieldError::new("cron", format!("{cron:?} never matches a date")));
        }
        Ok(table)
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.tz), false).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The first tick at or after `t`.
    fn next_from(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.tz), true).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The last tick strictly before `t`.
    fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t.with_timezone(&self.tz), false).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The next `n` ticks after `t`.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    out.push(next);
                    at = next;
                }
                None => break,
            }
        }
        out
    }

    /// What to run for a schedule whose `next_run_at` is due at `now`: the ticks to create jobs for,
    /// oldest first, and the schedule's new `next_run_at` (the first tick after `now`).
    ///
    /// Ticks within [`LATE_GRACE`] of `now` are late, not missed, and all run. Older ones follow the
    /// policy: none, the latest one, or the latest [`MAX_CATCH_UP`].
    pub fn due(&self, next_run_at: DateTime<Utc>, now: DateTime<Utc>, missed: Missed) -> Due {
        let grace = chrono::Duration::from_std(LATE_GRACE).expect("the grace fits");
        let late_from = now - grace;
        let mut ticks = Vec::new();
        if next_run_at < late_from {
            match missed {
                Missed::Skip => {}
                Missed::Once => ticks.extend(self.previous_before(late_from).filter(|t| *t >= next_run_at)),
                Missed::All => {
                    let mut at = late_from;
                    while ticks.len() < MAX_CATCH_UP {
                        match self.previous_before(at) {
                            Some(t) if t >= next_run_at => {
                                ticks.push(t);
                                at = t;
                            }
                            _ => break,
                        }
                    }
                    ticks.reverse();
                }
            }
        }
        let mut at = self.next_from(next_run_at.max(late_from));
        let mut late = 0;
        while let Some(t) = at.filter(|t| *t <= now) {
            if late == MAX_LATE {
                break;
            }
            ticks.push(t);
            late += 1;
            at = self.next_after(t);
        }
        Due { ticks, next_run_at: self.next_after(now) }
    }
}

/// See [`Timetable::due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub ticks: Vec<DateTime<Utc>>,
    /// `None` only for an expression with no future tick.
    pub next_run_at: Option<DateTime<Utc>>,
}

/// The unique key of the job a schedule creates for a tick: the second guard, after the
/// `schedule_runs` primary key, that a tick creates one job.
pub fn tick_key(name: &str, tick: DateTime<Utc>) -> String {
    format!("schedule:{name}:{}", tick.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// A schedule as the API and the config file give it (the job template and the timing).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub queue: String,
    pub payload: serde_json::Value,
    pub priority: i32,
    pub max_attempts: Option<i32>,
    pub missed: Missed,
}

impl ScheduleSpec {
    /// Checks every field the schema checks, naming the first that is wrong, and returns the parsed
    /// timetable.
    pub fn validate(&self) -> Result<Timetable, FieldError> {
        check_name(&self.name)?;
        let table = Timetable::parse(&self.cron, &self.timezone)?;
        // The job fields are checked exactly as POST /jobs checks them.
        let job = crate::job::NewJob {
            queue: self.queue.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            run_at: None,
            max_attempts: self.max_attempts,
            unique_key: None,
            after: Vec::new(),
        };
        job.validate()?;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        assert_eq!(Timetable::parse("61 * * * *", "UTC").unwrap_err().field, "cron");
        assert_eq!(Timetable::parse("* * *", "UTC").unwrap_err().field, "cron");
        assert_eq!(Timetable::parse("0 0 31 2 *", "UTC").unwrap_err().field, "cron");
        assert_eq!(Timetable::parse("* * * * *", "Mars/Olympus").unwrap_err().field, "timezone");
        assert!(Timetable::parse("@hourly", "Europe/Berlin").is_ok());
        assert!(Timetable::parse("*/1 * * * * *", "UTC").is_ok());
    }

    /// 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST, so 02:30 does not exist that day; the
    /// tick runs once at the first valid instant after the gap, 03:00 CEST (01:00 UTC).
    #[test]
    fn a_local_time_skipped_by_spring_forward_runs_once_after_the_gap() {
        let t = Timetable::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let runs = t.upcoming(utc("2026-03-27T12:00:00Z"), 4);
        assert_eq!(
            runs,
            [
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST: the gap's end
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
                utc("2026-03-31T00:30:00Z"),
            ]
        );
    }

    /// 2026-10-25: Berlin goes back from 03:00 CEST to 02:00 CET, so 02:30 happens twice; the tick
    /// runs once, at the first occurrence (00:30 UTC), not again an hour later.
    #[test]
    fn a_local_time_repeated_by_fall_back_runs_once() {
        let t = Timetable::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let runs = t.upcoming(utc("2026-10-23T12:00:00Z"), 4);
        assert_eq!(
            runs,
            [
                utc("2026-10-24T00:30:00Z"), // 02:30 CEST
                utc("2026-10-25T00:30:00Z"), // 02:30 CEST, the first of the two
                utc("2026-10-26T01:30:00Z"), // 02:30 CET
                utc("2026-10-27T01:30:00Z"),
            ]
        );
    }

    #[test]
    fn late_ticks_always_run_and_missed_ones_follow_the_policy() {
        let t = Timetable::parse("*/1 * * * * *", "UTC").unwrap();
        let now = utc("2026-01-01T12:00:00.5Z");
        // Two seconds late: both ticks run under every policy.
        for missed in [Missed::Skip, Missed::Once, Missed::All] {
            let due = t.due(utc("2026-01-01T11:59:59Z"), now, missed);
            assert_eq!(due.ticks, [utc("2026-01-01T11:59:59Z"), utc("2026-01-01T12:00:00Z")]);
            assert_eq!(due.next_run_at, Some(utc("2026-01-01T12:00:01Z")));
        }
        // Down for an hour: the 30 s of grace run, the rest per policy.
        let down = utc("2026-01-01T11:00:00Z");
        assert_eq!(t.due(down, now, Missed::Skip).ticks.len(), 31);
        let once = t.due(down, now, Missed::Once).ticks;
        assert_eq!((once.len(), once[0]), (32, utc("2026-01-01T11:59:29Z")));
        let all = t.due(down, now, Missed::All).ticks;
        assert_eq!((all.len(), all[0], all[99]), (131, utc("2026-01-01T11:57:50Z"), utc("2026-01-01T11:59:29Z")));
        assert!(all.windows(2).all(|w| w[0] < w[1]), "oldest first, no tick twice");
    }

    #[test]
    fn a_daily_schedule_down_for_five_days() {
        let t = Timetable::parse("0 3 * * *", "UTC").unwrap();
        let now = utc("2026-01-10T15:00:00Z");
        let since = utc("2026-01-05T03:00:00Z");
        assert!(t.due(since, now, Missed::Skip).ticks.is_empty());
        assert_eq!(t.due(since, now, Missed::Once).ticks, [utc("2026-01-10T03:00:00Z")]);
        assert_eq!(t.due(since, now, Missed::All).ticks.len(), 6);
        assert_eq!(t.due(since, now, Missed::All).next_run_at, Some(utc("2026-01-11T03:00:00Z")));
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("nightly-report").is_ok());
        assert!(check_name("a.b_c:d").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("with space").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
    }
}
