//! Wake-ups for remote long-polls, per queue.
//!
//! The dispatcher wakes a queue's producer with `notify_one`; remote waiters are different: any number
//! of HTTP requests may wait on one queue, from any queue name a client chooses. So each queue that
//! has waiters right now has a [`Notify`] here, woken with `notify_waiters` (every waiter tries; the
//! claim's `SKIP LOCKED` sorts out who gets what), and its entry goes when its last waiter does.
//! A waiter must `enable()` its `Notified` before it claims, so a wake-up between an empty claim and
//! the wait is not lost.

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

    /// Wakes every remote waiter of `queue` on this instance.
    pub fn wake(&self, queue: &str) {
        if let Some(n) = self.queues.lock().expect("wakes poisoned").get(queue) {
            n.notify_waiters();
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
