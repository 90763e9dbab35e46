//! Client misbehaviour in the log: what a slow or broken client does is its own problem, but an
//! operator should still see that it happens (a slowloris run, a scanner, a proxy cutting requests).
//! So each kind is logged at info level, at most once per [`WINDOW`], every line counting the like
//! events it did not show (`suppressed`); each single event is logged at debug level. A flood of 2,000
//! slow connections is then a handful of lines, not 2,000 (which it was, at ERROR level, with warp's
//! own server).

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use slog::{debug, info, Logger};

/// At most one info line per kind in this long.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What a client did. `name` is the stable value of the `kind` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Part of a request head arrived, the rest not within HTTP_HEADER_TIMEOUT (slowloris).
    SlowHead,
    /// The body did not arrive within HTTP_BODY_TIMEOUT (answered 408).
    SlowBody,
    /// The connection ended in the middle of a request, or was reset.
    BrokenOff,
    /// Not HTTP/1.1, a request head over the limits, or ambiguous body framing (answered 4xx).
    Malformed,
    /// A connection past MAX_CONNECTIONS (answered 503).
    OverConnectionLimit,
}

const KINDS: usize = 5;

impl Misbehaviour {
    pub fn name(self) -> &'static str {
        match self {
            Misbehaviour::SlowHead => "slow_head",
            Misbehaviour::SlowBody => "slow_body",
            Misbehaviour::BrokenOff => "broken_off",
            Misbehaviour::Malformed => "malformed",
            Misbehaviour::OverConnectionLimit => "over_connection_limit",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Misbehaviour::SlowHead => "client too slow: request head not received in time; connection closed",
            Misbehaviour::SlowBody => "client too slow: request body not received in time; answered 408",
            Misbehaviour::BrokenOff => "client broke off a request",
            Misbehaviour::Malformed => "client sent a request that cannot be served; refused",
            Misbehaviour::OverConnectionLimit => "connection refused: MAX_CONNECTIONS are open",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default, Clone, Copy)]
struct Slot {
    /// When the last info line of this kind was written.
    logged_at: Option<Instant>,
    /// Events since then that no line showed.
    suppressed: u64,
}

/// The rate limiter, shared by the accept loop and every connection of one server.
pub struct Noise {
    log: Logger,
    slots: Mutex<[Slot; KINDS]>,
}

impl Noise {
    /// `log` carries `instance` and `component`, as every line of the service does.
    pub fn new(log: Logger) -> Noise {
        Noise { log, slots: Mutex::new([Slot::default(); KINDS]) }
    }

    /// One event: a debug line always, an info line if none of this kind was written in the window.
    pub fn report(&self, what: Misbehaviour, peer: SocketAddr, err: &dyn Display) {
        debug!(self.log, "{}", what.message(); "kind" => what.name(), "peer" => %peer, "err" => %err);
        let suppressed = {
            let mut slots = self.slots.lock().expect("noise slots poisoned");
            let slot = &mut slots[what.index()];
            let now = Instant::now();
            if slot.logged_at.is_some_and(|at| now.duration_since(at) < WINDOW) {
                slot.suppressed += 1;
                return;
            }
            slot.logged_at = Some(now);
            std::mem::take(&mut slot.suppressed)
        };
        info!(self.log, "{}", what.message(); "kind" => what.name(), "suppressed" => suppressed, "peer" => %peer,
              "err" => %err);
    }

    /// Writes the count of events no line showed, for each kind whose window has ended with no event
    /// after it (or for every kind, with `all`, at shutdown); otherwise the tail of a flood would never
    /// be reported. Called every [`WINDOW`].
    pub fn flush(&self, all: bool) {
        let mut due = Vec::new();
        {
            let mut slots = self.slots.lock().expect("noise slots poisoned");
            let now = Instant::now();
            for (i, slot) in slots.iter_mut().enumerate() {
                let ended = all || slot.logged_at.is_some_and(|at| now.duration_since(at) >= WINDOW);
                if ended && slot.suppressed > 0 {
                    due.push((i, std::mem::take(&mut slot.suppressed)));
                    slot.logged_at = Some(now);
                }
            }
        }
        for (i, suppressed) in due {
            let what = ALL[i];
            info!(self.log, "{}", what.message(); "kind" => what.name(), "suppressed" => suppressed);
        }
    }
}

const ALL: [Misbehaviour; KINDS] = [
    Misbehaviour::SlowHead,
    Misbehaviour::SlowBody,
    Misbehaviour::BrokenOff,
    Misbehaviour::Malformed,
    Misbehaviour::OverConnectionLimit,
];

/// Marks a response the API gave to a misbehaving client (a body that broke off or came too slowly),
/// so that the server reports it here instead of the API logging it as an ordinary request.
#[derive(Debug, Clone, Copy)]
pub struct ClientFault(pub Misbehaviour);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_indexed_in_order() {
        for (i, what) in ALL.iter().enumerate() {
            assert_eq!(what.index(), i, "{}", what.name());
        }
    }
}
