//! The `drill` handler: for fault drills (`scripts/chaos.sh`) and for seeing retries happen. It does
//! no work; it answers with who ran which attempt, and panics on demand, so that a drill can show that
//! a panicking handler ends its attempt as an error and never takes the instance down.
//!
//! It is a handler kind of its own, chosen per queue in the config file, rather than a payload flag of
//! `builtin`: a client that can insert jobs must not be able to make a production queue panic (and
//! write a panic report to the log) by sending `{"panic_attempts": 9}`.

use serde_json::{json, Value};

use crate::worker::handler::{Handler, HandlerFuture, JobContext};

/// The payload key that makes the handler panic on the job's first N attempts.
pub const PANIC_ATTEMPTS: &str = "panic_attempts";

pub struct DrillHandler;

impl Handler for DrillHandler {
    fn handle(&self, ctx: JobContext) -> HandlerFuture {
        let job = ctx.job;
        let panics_until = job.payload.get(PANIC_ATTEMPTS).and_then(Value::as_i64).unwrap_or(0);
        Box::pin(async move {
            // Inside the future, so the panic happens while the executor polls it, as a real
            // handler's would (the executor catches both kinds; this is the common one).
            if i64::from(job.attempts) <= panics_until {
                panic!("drill: {PANIC_ATTEMPTS} is {panics_until}, and this is attempt {}", job.attempts);
            }
            // The holder as claimed: the chaos checker compares it with the row's holder at the end.
            Ok(json!({ "job": job.id, "attempt": job.attempts, "instance": job.locked_by }))
        })
    }
}
