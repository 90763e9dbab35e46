//! Wake-ups for remote long-polls, per queue.
//!
//! Any number of HTTP requests may wait on one queue, from any queue name a client chooses, so each
//! queue that has waiters right now has a [`Notify`] here, and its entry goes when its last waiter
//! does. A notification wakes one waiter (`notify_one`), not all of them: with a thousand idle workers,
//! one inserted job must not cost a thousand claims. A waiter whose claim came back full passes the
//! wake-up on, so a large insert still reaches as many waiters as it needs. A waiter must `enable()`
//! its `Notified` before it claims, so a wake-up between an empty claim and the wait is not lost; one
//! that is dropped after being woken hands the wake-up to the next waiter (tokio does that).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct QueueWakes {
    queues: Mutex<HashMap<String, Arc<Notify>>>,
}

impl QueueWakes {
    /// Registers a waiter on `queue` for as long as the returned value lives.
    pub fn register(self: &Arc<Self>, queue: &str) -> Registration {
        let notify = self.queues.lock().expect("wakes poisoned").entry(queue.to_string()).or_default().clone();
        Registration { wakes: self.clone(), queue: queue.to_string(), notify }
    }

    /// Wakes one remote waiter of `queue` on this instance (or the next to wait, if none waits now).
    pub fn wake(&self, queue: &str) {
        if let Some(n) = self.queues.lock().expect("wakes poisoned").get(queue) {
            n.notify_one();
        }
    }

    /// Wakes every remote waiter (after the listen connection reconnected: notifications were lost).
    pub fn wake_all(&self) {
        for n in self.queues.lock().expect("wakes poisoned").values() {
            n.notify_waiters();
        }
    }

    /// Queues with at least one waiter now.
    pub fn waiting_queues(&self) -> usize {
        self.queues.lock().expect("wakes poisoned").len()
    }
}

pub struct Registration {
    wakes: Arc<QueueWakes>,
    queue: String,
    pub notify: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut queues = self.wakes.queues.lock().expect("wakes poisoned");
        // The map's reference and ours: we are the last waiter.
        if Arc::strong_count(&self.notify) == 2 {
            queues.remove(&self.queue);
        }
    }
}
